"""Both Lightning namespaces, ``lightning.pytorch`` and ``pytorch_lightning``, in one process.

``pip install lightning`` (2.6) installs ``pytorch-lightning`` beside it: two copies of the same code, whose
classes are distinct (``lightning.pytorch.Callback is not pytorch_lightning.Callback``, and so for loggers).
The callbacks subclass the ``Callback`` of every namespace installed, so that ``isinstance``, Lightning's
``is_overridden`` and LightningCLI's subclass check hold in either; loggers are recognised by the classes of
every namespace. Importing the second namespace after the first costs about 50 ms.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


NAMESPACES: tuple[ModuleType, ...] = tuple(
    ns for ns in (_optional("lightning.pytorch"), _optional("pytorch_lightning")) if ns is not None
)
if not NAMESPACES:
    raise ImportError(
        "lightning_rnnviz's callbacks need Lightning: `pip install pytorch-lightning` (or `pip install lightning`)."
    )

CALLBACK_BASES: tuple[type, ...] = tuple(ns.Callback for ns in NAMESPACES)


def classes(name: str, module: str = "loggers") -> tuple[type, ...]:
    """Class ``name`` of ``<namespace>.<module>`` in every namespace that has it, e.g. ``classes("CSVLogger")``."""
    found = []
    for ns in NAMESPACES:
        cls = getattr(importlib.import_module(f"{ns.__name__}.{module}"), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def namespace_of(trainer: Any) -> ModuleType:
    """The namespace whose ``Trainer`` runs ``trainer`` (the first one installed for anything else)."""
    for ns in NAMESPACES:
        if isinstance(trainer, ns.Trainer):
            return ns
    return NAMESPACES[0]


def info(trainer: Any, message: str) -> None:
    """An info line as Lightning's own messages are written (``rank_zero_info`` of ``trainer``'s namespace)."""
    importlib.import_module(f"{namespace_of(trainer).__name__}.utilities.rank_zero").rank_zero_info(message)
