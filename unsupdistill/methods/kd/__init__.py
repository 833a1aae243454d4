"""Distillation with labels (``settings.py``: the ``kd`` section, torch-free; ``method.py``: the method)."""
