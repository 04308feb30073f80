"""The interface every sink implements, and what it receives: encoded pictures and histogram buckets."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_rnnviz.names import safe_name

__all__ = ["Histogram", "Picture", "Sink", "safe_name"]


@dataclass
class Picture:
    """One drawn picture, PNG-encoded once for every sink.

    Attributes:
        png: the PNG file's bytes (8-bit RGB).
        width, height: its size in pixels.
    """

    png: bytes
    width: int
    height: int
    _rgb: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_rgb(cls, rgb: np.ndarray) -> Picture:
        """Encode an ``(H, W, 3)`` uint8 array (the array is kept, so :meth:`rgb` costs nothing)."""
        from lightning_rnnviz.sinks.png import encode_png

        picture = cls(encode_png(rgb), int(rgb.shape[1]), int(rgb.shape[0]))
        picture._rgb = rgb
        return picture

    def rgb(self) -> np.ndarray:
        """The ``(H, W, 3)`` uint8 pixels, decoded on first use (for loggers that want an array)."""
        if self._rgb is None:
            from PIL import Image

            with Image.open(io.BytesIO(self.png)) as image:
                self._rgb = np.asarray(image.convert("RGB"))
        return self._rgb


@dataclass(frozen=True)
class Histogram:
    """Buckets of a set of finite values, counted once for every sink (by
    :func:`lightning_rnnviz.render.report.histogram_buckets`, where the record lives), in TensorBoard's layout:
    each bucket is bounded on the right by ``limits[i]``, the first starts at ``min``.

    Attributes:
        min, max, num, sum, sum_squares: of the values.
        limits: ``(buckets,)`` right edge of each bucket; the last equals ``max``.
        counts: ``(buckets,)`` how many values fall in each bucket.
    """

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    limits: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_buckets(cls, buckets: Mapping[str, Any] | None) -> Histogram | None:
        """A histogram of buckets counted elsewhere (a mapping of this class's fields); ``None`` for
        ``None`` (nothing finite to count)."""
        if buckets is None:
            return None
        fields = {k: buckets[k] for k in ("min", "max", "num", "sum", "sum_squares")}
        return cls(**{k: float(v) for k, v in fields.items()},
                   limits=np.asarray(buckets["limits"], dtype=np.float64),
                   counts=np.asarray(buckets["counts"], dtype=np.float64))


def json_text(data: Mapping[str, Any] | str) -> str:
    """``data`` as compact JSON (a ``str`` is taken as JSON text already). Without ``indent`` the json
    module's C encoder runs; with it, a pure-Python one that took milliseconds for a run's ``summary.json``,
    rewritten at every epoch end and growing with the epochs (``python -m json.tool`` shows it indented)."""
    if isinstance(data, str):
        return data
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def write_json(path: Path, data: Mapping[str, Any] | str) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json_text(data))
    os.replace(temporary, path)


class Sink:
    """Receives what a recording step produced. Implementations must be cheap to call when idle.

    Attributes:
        name: how warnings name this sink, e.g. ``"TensorBoard"``.
        wants_histograms: whether :meth:`histogram` keeps anything (histograms are computed only if some
            sink wants them).
        beside_training: whether the sink may be written from a thread beside training (it writes only
            what is ours, with no logger object of the user's in between); the recording worker then
            writes it as soon as a recording is finished, not at the training thread's next hook, and
            flushes it. :meth:`writes_beside` may allow it for some kinds of writes only.
    """

    name = "sink"
    wants_histograms = False
    beside_training = False

    def writes_beside(self, kind: str) -> bool:
        """Whether writes of ``kind`` (``"picture"``, ``"scalars"``, ``"histogram"``, ``"text"``,
        ``"document"``, ``"probe_set"``) may be done by the recording worker, beside training; by default
        :attr:`beside_training` for every kind. Where the sink is not :attr:`beside_training`, the worker
        makes those writes without the output's lock, while the training thread may be writing the other
        kinds: they must touch nothing those use."""
        return self.beside_training

    def image(self, tag: str, picture: Picture, step: int) -> None:
        """Write a picture under ``tag`` (``rnnviz/<quantity>/<module>``)."""
        raise NotImplementedError

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write scalars, each tag ``rnnviz/<quantity>/<module>/<statistic>``."""
        raise NotImplementedError

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        """Write a histogram (called only when :attr:`wants_histograms`)."""

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Write a short markdown text (e.g. a table of findings)."""

    def probe_set(self, tag: str, blob: bytes, step: int) -> None:
        """Write a probe set, the explorer's data for one recording (a blob of :mod:`lightning_rnnviz.payload`'s
        format), under ``tag`` (``rnnviz/probe_set/train`` or ``rnnviz/probe_set/val``); only TensorBoard keeps
        it, the other sinks ignore it."""

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Group scalars into charts, ``{category: {chart title: [tag regex, ...]}}``, where the logger can."""

    @property
    def data_dir(self) -> Path | None:
        """A local folder that belongs to the run, for the callback's data files (``summary.json``,
        ``records/``); ``None`` when the logger has none."""
        return None

    def document(self, name: str, data: Mapping[str, Any] | str) -> None:
        """Store a JSON document (a mapping, or its JSON text) with the run: ``<data_dir>/<name>``, replaced
        atomically."""
        folder = self.data_dir
        if folder is not None:
            write_json(folder / name, data)

    def flush(self) -> None:
        """Make everything written so far visible to readers (called at the end of each recording step)."""

    def close(self) -> None:
        """Release what the sink opened itself (a logger's own writer is left to the logger)."""
