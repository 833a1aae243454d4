"""The methods' name table: what ``method: NAME`` means, without importing torch.

Each entry names, as ``"module:attribute"`` strings, the method's class (imported when a run builds it) and its
settings module (imported when a config is loaded: it holds dataclasses only). A config, a recipe and
``unsupdistill --help`` read this table and the settings modules and nothing heavier; a new method is one
:func:`register` call (or one line of :data:`BUILT_IN`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Flag:
    """A command-line flag a method adds to its verb: ``--teacher X`` sets ``distill.teacher=X``.

    Attributes:
        name: the flag, e.g. ``--teacher``.
        key: the dotted config key it sets.
        help: its help text.
        metavar: the placeholder in the usage line.
    """

    name: str
    key: str
    help: str
    metavar: str = "VALUE"


@dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Attributes:
        name: the ``method`` value of the config.
        method: ``"module:Class"`` of its :class:`~unsupdistill.train.method.Method` subclass, or the class itself.
        settings: ``"module"`` of its settings (torch-free), or the module object: ``SECTIONS`` (section name ->
            dataclass), optionally ``RENAMED`` (old dotted key -> new) and ``FLAGS`` (:class:`Flag` s).
        verb: the CLI verb whose default it is (``pretrain``, ``distill``); it also runs under any verb when a
            recipe or ``method=`` names it.
        uses_labels: the verb's default when ``data.labels`` is given (``kd`` for ``distill``).
    """

    name: str
    method: Any
    settings: Any
    verb: str
    uses_labels: bool = False
    loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def settings_module(self) -> Any:
        if "settings" not in self.loaded:
            self.loaded["settings"] = (importlib.import_module(self.settings) if isinstance(self.settings, str)
                                       else self.settings)
        return self.loaded["settings"]

    def method_class(self) -> Any:
        if "method" not in self.loaded:
            self.loaded["method"] = _resolve(self.method) if isinstance(self.method, str) else self.method
        return self.loaded["method"]


BUILT_IN = (
    MethodEntry("dino", "unsupdistill.methods.dino.method:DINO", "unsupdistill.methods.dino.settings", "pretrain"),
    MethodEntry("distill", "unsupdistill.methods.distill.method:Distillation",
                "unsupdistill.methods.distill.settings", "distill"),
    MethodEntry("kd", "unsupdistill.methods.kd.method:KnowledgeDistillation", "unsupdistill.methods.kd.settings",
                "distill", uses_labels=True),
)
"""The methods that ship with the package."""

_ENTRIES: dict[str, MethodEntry] = {entry.name: entry for entry in BUILT_IN}


def register(name: str, method: Any, settings: Any, verb: str = "pretrain", uses_labels: bool = False) -> None:
    """Make ``method: name`` known: ``method`` is the class or ``"module:Class"``, ``settings`` a module (object or
    dotted name) with ``SECTIONS`` (and optionally ``RENAMED``, ``FLAGS``); see :class:`MethodEntry`. A name
    registered again is replaced."""
    _ENTRIES[name] = MethodEntry(name, method, settings, verb, uses_labels)


def unregister(name: str) -> None:
    """Forget a method registered by :func:`register` (the built-in ones stay)."""
    if name not in {entry.name for entry in BUILT_IN}:
        _ENTRIES.pop(name, None)


def names() -> list[str]:
    """The registered ``method`` values, in registration order."""
    return list(_ENTRIES)


def entry(name: str) -> MethodEntry:
    """The entry of ``name``; KeyError for an unknown one (the config's checks name the allowed values first)."""
    return _ENTRIES[name]


def sections() -> dict[str, type]:
    """Every method's settings sections by name (a section two methods read is declared once, by the first)."""
    found: dict[str, type] = {}
    for item in _ENTRIES.values():
        for section, cls in item.settings_module().SECTIONS.items():
            found.setdefault(section, cls)
    return found


def sections_of(name: str) -> frozenset[str]:
    """The sections method ``name`` reads (``kd`` reads ``distill``'s too)."""
    return frozenset(entry(name).settings_module().SECTIONS) if name in _ENTRIES else frozenset()


def renamed() -> dict[str, str]:
    """Old dotted keys and their new names, from every method's settings (read with a warning)."""
    found: dict[str, str] = {}
    for item in _ENTRIES.values():
        found.update(getattr(item.settings_module(), "RENAMED", {}))
    return found


def flags() -> dict[str, tuple[Flag, list[str]]]:
    """Every method's flags by name, with the methods that declare each."""
    found: dict[str, tuple[Flag, list[str]]] = {}
    for item in _ENTRIES.values():
        for flag in getattr(item.settings_module(), "FLAGS", ()):
            found.setdefault(flag.name, (flag, []))[1].append(item.name)
    return found


def default_method(verb: str, labeled: bool = False) -> str:
    """The method a verb runs when neither the recipe nor ``method=`` names one: the first registered for the verb
    that learns from labels when ``labeled`` (``data.labels`` is set), and the first without otherwise."""
    candidates = [item for item in _ENTRIES.values() if item.verb == verb]
    if not candidates:
        raise KeyError(f"no method is registered for the verb {verb!r}")
    return next((item for item in candidates if item.uses_labels == labeled), candidates[0]).name


def method_class(name: str) -> Any:
    """The :class:`~unsupdistill.train.method.Method` subclass of ``name`` (imports it, and so torch)."""
    return entry(name).method_class()


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
