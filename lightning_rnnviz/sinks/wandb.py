"""Weights & Biases: pictures, scalars, histograms and findings through a Lightning ``WandbLogger``.

Works with the ``WandbLogger`` of either Lightning namespace (``pytorch_lightning`` or
``lightning.pytorch``), duck-typed: the sink needs the logger's ``log_metrics(metrics, step)`` and reads
its ``experiment`` (the ``wandb`` run) for one setting.

Steps. Lightning's ``WandbLogger.log_metrics(metrics, step)`` does not hand ``step`` to ``wandb.log``: it
logs ``{**metrics, "trainer/global_step": step}`` as a new history row, and at the run's start declares
``define_metric("*", step_metric="trainer/global_step")``. This sink goes through the same call, so
everything it logs carries the same ``trainer/global_step`` as the user's ``self.log`` scalars of that
step, charts share their x-axis, and W&B's own row counter ``_step`` only ever grows (``wandb.log`` with
a ``step=`` below the last one would be dropped). A step's pictures, scalars, histograms and text are
buffered and logged as one row, in :meth:`WandbSink.flush` or when a call for another step arrives.

Pictures. ``wandb.Image`` of an array re-encodes it with Pillow (about 12 ms for an 800x600 picture);
given a file it keeps the file's bytes, so our PNG goes to a temporary file that ``wandb.log`` copies
into the run's ``files/media/images`` before it returns (about 2.5 ms in all). The temporary file is
deleted right after; where the run links media instead of copying them (``allow_media_symlink``), the
sink hands over the array instead, as a link to a deleted file would be an empty picture.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightning_rnnviz.sinks.base import Histogram, Picture, Sink

_MAX_BINS = 512  # wandb.Histogram refuses more


def histogram_edges(histogram: Histogram, max_bins: int = _MAX_BINS) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, edges)`` for ``wandb.Histogram(np_histogram=...)`` from right-edged buckets.

    The first bucket starts at ``histogram.min``; edges beyond ``[min, max]`` (an open-ended last bucket)
    are clamped to that range; more than ``max_bins`` buckets are merged in runs of adjacent ones.

    Example::

        >>> from types import SimpleNamespace as H
        >>> counts, edges = histogram_edges(H(min=0.0, max=3.0, limits=np.array([1.0, 2.0, 3.0]),
        ...                                   counts=np.array([4, 0, 1])))
        >>> counts.tolist(), edges.tolist()
        ([4.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0])
    """
    counts = np.asarray(histogram.counts, dtype=np.float64).ravel()
    limits = np.asarray(histogram.limits, dtype=np.float64).ravel()
    if counts.size != limits.size:
        raise ValueError(f"{counts.size} counts for {limits.size} bucket limits")
    low, high = float(histogram.min), float(histogram.max)
    if counts.size > max_bins:
        group = -(-counts.size // max_bins)  # ceil
        pad = (-counts.size) % group
        counts = np.concatenate([counts, np.zeros(pad)]).reshape(-1, group).sum(axis=1)
        limits = np.concatenate([limits, np.full(pad, limits[-1])])[group - 1 :: group]
    edges = np.concatenate([[low], limits])
    edges = np.clip(np.nan_to_num(edges, nan=high, posinf=high, neginf=low), low, high)
    return counts, edges


_TABLE_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>"),
    (re.compile(r"(?<![*\w])\*([^*]+)\*(?![*\w])"), r"<i>\1</i>"),
]
_STYLE = (
    "<style>body{font-family:sans-serif;font-size:13px;margin:6px}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    "th{background:#f3f3f3}code{font-size:12px}</style>"
)


def _inline(text: str) -> str:
    text = html.escape(text.replace("\\|", "|"), quote=False)  # an escaped pipe is a pipe
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return text


def _cells(line: str) -> list[str]:
    line = line.strip().removeprefix("|")
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)]  # "\|" is a pipe inside a cell


def markdown_html(markdown: str) -> str:
    """A small, self-contained HTML page of the markdown we write: ``#`` headings, ``|`` tables (``\\|`` is
    a ``|`` in a cell), paragraphs, ``**bold**``, ``*italic*`` and `` `code` ``; everything else is shown as
    text.

    Example::

        >>> page = markdown_html("**NaN** found\\n\\n| unit | gate |\\n|---|---|\\n| 3 | `f` |")
        >>> print(page.split("<body>")[1].removesuffix("</body></html>"))
        <p><b>NaN</b> found</p>
        <table><tr><th>unit</th><th>gate</th></tr>
        <tr><td>3</td><td><code>f</code></td></tr></table>
    """
    lines = markdown.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if stripped.startswith("|") and _TABLE_SEPARATOR.match(following.strip()):
            header = "".join(f"<th>{_inline(c)}</th>" for c in _cells(stripped))
            rows = [f"<table><tr>{header}</tr>"]
            index += 2
            while index < len(lines) and lines[index].strip().startswith("|"):
                rows.append(
                    "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[index])) + "</tr>"
                )
                index += 1
            out.append("\n".join(rows) + "</table>")
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)  # a finding's heading is not a page title
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif stripped:
            paragraph = [stripped]
            while (
                index + 1 < len(lines)
                and lines[index + 1].strip()
                and not lines[index + 1].strip().startswith(("|", "#"))
            ):
                index += 1
                paragraph.append(lines[index].strip())
            out.append(f"<p>{'<br>'.join(_inline(p) for p in paragraph)}</p>")
        index += 1
    return "<html><head><meta charset='utf-8'>" + _STYLE + "</head><body>" + "\n".join(out) + "</body></html>"


class WandbSink(Sink):
    """Everything a recording step produced, as one W&B history row at that step.

    Pictures appear in W&B's media panel under their tags (``rnnviz/hidden/<module>``), scalars as
    charts, histograms in W&B's histogram view (``rnnviz/hidden_dist/<module>``), and
    text (markdown findings) as HTML beside the pictures: an HTML media panel has the same step slider
    as the pictures and shows the table as a table, where a ``wandb.Table`` would be a separate table
    panel of string cells.

    Args:
        logger: a Lightning ``WandbLogger`` (either namespace), or anything with
            ``log_metrics(metrics, step)`` and an ``experiment`` that is a ``wandb`` run.
        histograms: log histograms (``wants_histograms``).

    The sink never finishes the run: that stays with the logger and the user (``wandb.finish()``).
    """

    name = "wandb"

    def __init__(self, logger: Any, histograms: bool = True) -> None:
        import wandb

        self._wandb = wandb
        self.logger = logger
        self.wants_histograms = histograms
        self._step: int | None = None
        self._pending: dict[str, Any] = {}  # tag -> ("image", Picture) | ("histogram", ...) | ...
        self._scalars: dict[str, float] = {}
        self._tmpdir: str | None = None
        self._counter = 0
        self._copy_media: bool | None = None

    @property
    def data_dir(self) -> Path | None:
        """``rnnviz/`` in the run's own files folder (W&B uploads it with the run)."""
        folder = getattr(getattr(self.logger, "experiment", None), "dir", None)
        return Path(folder) / "rnnviz" if folder else None

    # --- buffering ---------------------------------------------------------------------------------
    def _at(self, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = int(step)

    def image(self, tag: str, picture: Picture, step: int) -> None:
        self._at(step)
        self._pending[tag] = ("image", picture)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if not values:
            return
        self._at(step)
        self._scalars.update((tag, float(value)) for tag, value in values.items())

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        if not self.wants_histograms or not float(histogram.num) or not len(histogram.counts):
            return
        self._at(step)
        self._pending[tag] = ("histogram", histogram)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self._at(step)
        self._pending[tag] = ("text", markdown)

    # --- writing -----------------------------------------------------------------------------------
    def _copies_media(self) -> bool:
        """Whether ``wandb.log`` copies (or hard-links) a file it is given, so that ours can go."""
        if self._copy_media is None:
            settings = getattr(getattr(self.logger, "experiment", None), "settings", None)
            self._copy_media = not bool(getattr(settings, "allow_media_symlink", False))
        return self._copy_media

    def _picture(self, picture: Picture, written: list[str]) -> Any:
        if not self._copies_media():
            return self._wandb.Image(picture.rgb())
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="rnnviz-wandb-")
        self._counter += 1
        path = os.path.join(self._tmpdir, f"{self._counter}.png")
        with open(path, "wb") as file:
            file.write(picture.png)
        written.append(path)
        return self._wandb.Image(path)

    def flush(self) -> None:
        """Log what this step produced as one row (nothing when nothing is waiting)."""
        if self._step is None or not (self._pending or self._scalars):
            return
        step, pending, scalars = self._step, self._pending, self._scalars
        self._pending, self._scalars = {}, {}
        written: list[str] = []
        try:
            row: dict[str, Any] = dict(scalars)
            for tag, (kind, item) in pending.items():
                if kind == "image":
                    row[tag] = self._picture(item, written)
                elif kind == "histogram":
                    row[tag] = self._wandb.Histogram(np_histogram=histogram_edges(item))
                else:
                    row[tag] = self._wandb.Html(markdown_html(item), inject=False)
            # The logger adds {"trainer/global_step": step} (and its prefix), as for the user's scalars.
            self.logger.log_metrics(row, step=step)
        finally:
            for path in written:  # wandb.log copied each one into the run's media folder
                try:
                    os.remove(path)
                except OSError:
                    pass

    def close(self) -> None:
        """Log what is still waiting and remove the sink's temporary folder; the run stays open."""
        try:
            self.flush()
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None
