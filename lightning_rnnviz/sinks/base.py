"""The interface every sink implements, and the one place module names are made safe."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def safe_name(name: str) -> str:
    """A module name as a tag or path component: letters, digits, ``_``, ``-`` and single dots only.

    Every dot-separated part is cleaned on its own, so no result can contain a path separator or a
    ``..`` component; the root module (``""``) becomes ``"root"``.

    Example::

        >>> safe_name("encoder.layers.0.self_attn"), safe_name(""), safe_name("../../etc/passwd")
        ('encoder.layers.0.self_attn', 'root', '_._._._._etc_passwd')
    """
    if not name:
        return "root"
    parts = [_UNSAFE.sub("_", part) or "_" for part in name.split(".")]
    return ".".join(parts)


class Sink:
    """Receives what a recording step produced. Implementations must be cheap to call when idle."""

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """Write an ``(H, W, 3)`` uint8 image under ``tag`` (``rnnviz/<quantity>/<module>``)."""
        raise NotImplementedError

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write scalars, each tag ``rnnviz/<quantity>/<module>/<statistic>``."""
        raise NotImplementedError

    def histogram(self, tag: str, values: Callable[[], np.ndarray], step: int) -> None:
        """Write a histogram of ``values()`` (called only by sinks that keep histograms)."""

    def flush(self) -> None:
        """Make everything written so far visible to readers."""

    def close(self) -> None:
        """Release files the sink opened itself (a logger's own writer is left to the logger)."""
