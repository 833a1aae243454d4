"""DINO: self-distillation with an EMA teacher (``settings.py``: its config section, torch-free; ``method.py``: the
method the engine runs)."""
