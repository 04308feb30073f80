"""Warnings a worker thread holds back for the training thread to give, and where warnings point.

``warnings.catch_warnings()`` swaps the process-wide filter list and is not thread-safe before Python
3.14, so a thread that works beside training must not use it to collect warnings. Nor should it warn
itself: the user's filters (``-W error``, pytest's) would then act on our worker instead of on their
own thread. Our own code warns through :func:`warn`; on a thread inside :func:`held` the warning is kept
in a list that belongs to that thread alone, and the training thread gives it later (:func:`give`), where
the user's filters apply as they always do.

A warning about a module points at the user's code: a Lightning hook or the worker thread has no frame of
the user's to point at, so it is given with :func:`warnings.warn_explicit` at the line where the user's
class is defined (:func:`locate`: the module's own class when the user wrote it, else the nearest
enclosing one, such as the ``LightningModule``). Where no class of the user's is known, the warning points
where :func:`warnings.warn` with ``stacklevel`` would. Either way it is registered as
:func:`warnings.warn` registers it (in the module that the location belongs to), so the ``"default"``
action shows it once per location, and ``-W`` filters that name a module match the user's module.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import sysconfig
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

_local = threading.local()

#: ``(filename, line, module name)`` of the class a warning points at
Location = tuple[str, int, str]
#: Where a warning points, worked out when it is given (on the training thread); ``None`` when unknown
Where = Callable[[], "Location | None"]
Held = list[tuple[str, type[Warning], "Where | None"]]

# packages whose classes are nobody's own code: a warning points past them, at the user's class
_LIBRARIES = frozenset({"torch", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_rnnviz",
                        "torchmetrics", "builtins"})
_registries: dict[str, dict[Any, Any]] = {}  # for a location whose module is not imported (exec'd code)


def warn(message: str, category: type[Warning], stacklevel: int = 2, where: Where | None = None) -> None:
    """:func:`give`, or kept for later on a thread inside :func:`held`; ``where`` (see :func:`locate`)
    is called when the warning is given."""
    kept: Held | None = getattr(_local, "held", None)
    if kept is not None:
        kept.append((message, category, where))
        return
    give(message, category, where, stacklevel=stacklevel + 1)


def give(message: str, category: type[Warning], where: Where | None = None, stacklevel: int = 2) -> None:
    """Warn ``message`` at the location ``where()`` gives (:func:`warnings.warn_explicit`), else as
    :func:`warnings.warn` with ``stacklevel`` (counted from the caller of this function) would."""
    location = None
    if where is not None:
        try:
            location = where()
        except Exception:  # noqa: BLE001 - where a warning points must never stop it
            location = None
    if location is None:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
        return
    filename, lineno, module = location
    loaded = sys.modules.get(module)
    module_globals = getattr(loaded, "__dict__", None)
    if module_globals is not None and module_globals.get("__file__") is not None:
        registry = module_globals.setdefault("__warningregistry__", {})
    else:
        registry, module_globals = _registries.setdefault(filename, {}), None
    warnings.warn_explicit(message, category, filename, lineno, module=module, registry=registry,
                           module_globals=module_globals)


@contextlib.contextmanager
def held() -> Iterator[Held]:
    """Keep this thread's warnings of ours (those given through :func:`warn`) in the list it yields."""
    previous = getattr(_local, "held", None)
    kept: Held = []
    _local.held = kept
    try:
        yield kept
    finally:
        _local.held = previous


def locate(model: Any, name: str | None = None) -> Location | None:
    """Where a warning about module ``name`` of ``model`` (``None``: the model itself) points: the file and
    line of the innermost class of the user's among that module and the modules that contain it, up to
    ``model`` (a ``LightningModule`` subclass, say); ``None`` when none is the user's (all are classes of
    PyTorch, Lightning or another installed library) or ``model`` is gone.

    For a ``model`` whose class ``Model`` the user wrote in ``train.py``, ``locate(model, "encoder.rnn")``
    is ``("train.py", <line of "class Model">, "train")`` when ``encoder.rnn`` is an ``nn.LSTM`` and
    ``encoder`` a ``Sequential``, or the line of the user's own ``class Encoder`` when ``encoder`` is one.

    Example::

        >>> import torch
        >>> locate(torch.nn.Sequential(torch.nn.LSTM(2, 3)), "0") is None  # PyTorch's classes only
        True
    """
    if model is None:
        return None
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        try:
            module = model.get_submodule(".".join(parts[:depth])) if depth else model
        except (AttributeError, TypeError):
            continue
        found = class_location(type(module))
        if found is not None:
            return found
    return None


def locator(model: Any) -> Callable[[str | None], Location | None]:
    """:func:`locate` for the modules of ``model``, which it holds weakly where it can (a callback that
    outlives its ``fit`` keeps no model alive)."""
    try:
        ref = weakref.ref(model)
    except TypeError:
        return functools.partial(locate, model)
    return lambda name=None: locate(ref(), name)


def where(model: Any, name: str | None = None) -> Where:
    """A ``where`` for :func:`warn`: :func:`locate` of ``model`` and ``name``, worked out when the warning
    is given."""
    return functools.partial(locate, model, name)


@functools.lru_cache(maxsize=256)
def class_location(cls: type) -> Location | None:
    """``(file, line, module)`` where ``cls`` is defined, when it is the user's: not a class of a library
    (:data:`_LIBRARIES`, or defined in an installed package or the standard library) and its source is
    known. Worked out once per class (reading its source takes milliseconds)."""
    module = getattr(cls, "__module__", None)
    if not isinstance(module, str) or module.split(".")[0] in _LIBRARIES:
        return None
    try:
        filename = inspect.getsourcefile(cls)
        line = inspect.getsourcelines(cls)[1] if filename else 0
    except (OSError, TypeError):
        return None
    if not filename or _installed(filename):
        return None
    return filename, max(int(line), 1), module


@functools.cache
def _library_folders() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    folders = {os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple(sorted(folder + os.sep for folder in folders))


def _installed(filename: str) -> bool:
    """Whether ``filename`` lies in the standard library or an installed package (site-packages)."""
    real = os.path.realpath(filename)
    return real.startswith(_library_folders()) or f"{os.sep}site-packages{os.sep}" in real \
        or f"{os.sep}dist-packages{os.sep}" in real
