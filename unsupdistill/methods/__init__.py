"""Training methods: each a package (or one file) of its own, named in :mod:`unsupdistill.registry`.

- ``dino``: self-distillation with an EMA teacher, from scratch (:class:`~unsupdistill.methods.dino.method.DINO`);
- ``distill``: knowledge distillation from a frozen teacher
  (:class:`~unsupdistill.methods.distill.method.Distillation`);
- ``kd``: distillation with labels (:class:`~unsupdistill.methods.kd.method.KnowledgeDistillation`).

Importing this package imports nothing heavy (the registry and the settings are torch-free); :func:`train` and
:func:`build_trainer` (in :mod:`unsupdistill.methods.running`) load on first use.
"""

from typing import Any

_LAZY = {"train", "build_trainer", "METHODS"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from unsupdistill.methods import running

        return getattr(running, name)
    raise AttributeError(f"module 'unsupdistill.methods' has no attribute '{name}'")
