"""Distillation from a frozen teacher (``settings.py``: its config section, torch-free; ``method.py``: the method;
``teacher_pass.py``: the teacher's one pass over the images and the budget's plan)."""
