"""Warnings a worker thread holds back for the training thread to give.

``warnings.catch_warnings()`` swaps the process-wide filter list and is not thread-safe before Python
3.14, so a thread that works beside training must not use it to collect warnings. Nor should it warn
itself: the user's filters (``-W error``, pytest's) would then act on our worker instead of on their
own thread. Our own code warns through :func:`warn`; on a thread inside :func:`held` the warning is kept
in a list that belongs to that thread alone, and the training thread gives it later, with
:func:`warnings.warn`, where the user's filters apply as they always do.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

_local = threading.local()

Held = list[tuple[str, type[Warning]]]


def warn(message: str, category: type[Warning], stacklevel: int = 2) -> None:
    """:func:`warnings.warn`, or kept for later on a thread inside :func:`held`."""
    kept: Held | None = getattr(_local, "held", None)
    if kept is not None:
        kept.append((message, category))
        return
    warnings.warn(message, category, stacklevel=stacklevel + 1)


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
