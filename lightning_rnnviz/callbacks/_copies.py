"""How a callback is saved and copied: a pickle holds its constructor arguments only, a copy reports to the original.

Libraries keep the callbacks they are given in places of their own. darts pickles its ``pl_trainer_kwargs``,
callbacks included, into the model file and loads it back with a restricted unpickler that accepts only the
classes allow-listed for it; a callback that pickles as its constructor arguments needs nothing allow-listed
but its own class (and any function passed to it). neuralforecast deep-copies the models it fits, their
callbacks with them: the object the user holds never runs, so a copy writes its results (findings, error
counts, where it drew, what it cost) into the same objects as the original.
"""

from __future__ import annotations

import functools
import pickle
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any


class Results:
    """What a run leaves for the user to read (besides the findings, gradient curves and error counts, which
    the reporter and the guard hold): one object shared by a callback and its copies."""

    def __init__(self) -> None:
        self.placement: str | None = None  # where pictures were drawn in the last fit: "inline", "thread", "process"
        self.stride = 1  # recordings are every `stride * every_n_steps` steps, as the budget allows
        self.cadence: int | None = None  # the steps between recordings in use (every_n_steps * stride)
        self.drawer_peak_rss_mb: float | None = None
        self.fit_overhead_ms: dict[str, float] = {}  # fit start, fit end, and the flushes after recordings


class SharedResult:
    """An attribute of the callback kept in its :class:`Results`, so that its copies share it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance._results, self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        setattr(instance._results, self.name, value)


def _functions(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """``(where, function)`` for every function in an argument's value: ``labels``, the extractors of the
    ``attention`` mapping, and what a ``functools.partial`` or a list holds."""
    if isinstance(value, functools.partial):
        for item in (value.func, *value.args, *value.keywords.values()):
            yield from _functions(item, where)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _functions(item, f"{where}'s entry {key!r}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _functions(item, where)
    elif isinstance(value, types.FunctionType):
        yield where, value


def _importable(function: types.FunctionType) -> bool:
    """Whether pickle can save ``function`` by name: its module, imported, has it under its qualified name."""
    if "<" in function.__qualname__:  # <lambda>, <locals>
        return False
    found: Any = sys.modules.get(function.__module__)
    for part in function.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is function


def check_saveable(owner: str, arguments: Mapping[str, Any]) -> None:
    """Raise :class:`pickle.PicklingError` naming the first argument that holds a function pickle cannot save
    by name (a lambda, a function defined inside another), and saying how to pass one it can.

    Example::

        >>> check_saveable("RNNViz", {"labels": lambda batch: []})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        _pickle.PicklingError: RNNViz cannot be saved: its `labels` argument is a lambda, ...
    """
    for name, value in arguments.items():
        for where, function in _functions(value, f"`{name}` argument"):
            if _importable(function):
                continue
            what = "a lambda" if function.__name__ == "<lambda>" else f"the local function {function.__qualname__!r}"
            raise pickle.PicklingError(
                f"{owner} cannot be saved: its {where} is {what}, which pickle can save only by an importable "
                f"name. Define it with `def` at the top level of a module (your script or package) and pass that "
                f"function instead; to load the file with a safe loader, allow-list it beside {owner} (darts: "
                f"`darts.utils.serialization.add_safe_globals([{owner}, your_function])`)."
            )
