"""TensorBoard: pictures, scalars, histograms, text, a Custom Scalars layout and the explorer's probe sets in a
run of our own."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning_rnnviz.sinks.base import Histogram, Picture, Sink
from lightning_rnnviz.sinks.events import (
    EventFile,
    blob_summary,
    histogram_summary,
    image_summary,
    layout_summary,
    scalars_summary,
    text_summary,
)

RUN = "rnnviz"


def run_dir(logger_dir: str | Path) -> str:
    """Where the callback's records of a logger's run go: ``<logger_dir>/rnnviz``.

    TensorBoard shows it as a run of its own (``version_0/rnnviz`` beside ``version_0``), because each of its
    loaders expects one writer per directory: the Python loader follows only the lexicographically last
    event file of a directory, so a second file beside the logger's would freeze one of the two.
    """
    text = str(logger_dir)
    return f"{text.rstrip('/')}/{RUN}" if "://" in text else str(Path(text) / RUN)


class TensorBoardSink(Sink):
    """Everything to one event file of our own in :func:`run_dir` of the logger's run.

    Our file frames each record with ``google-crc32c``; TensorBoard's own writer would spend about 25 ms
    of GIL per picture on a pure-Python CRC. A remote directory (``s3://``, ``gs://``) goes through a
    ``SummaryWriter`` of its own in the same place instead.

    Args:
        directory: the run directory for our records (see :func:`run_dir`).
        histograms: keep histograms (TensorBoard's Distributions and Histograms dashboards).
        flush_also: called on every :meth:`flush`, e.g. the logger's own ``SummaryWriter.flush``, so that
            the user's scalars of a step appear together with its pictures.
        writer_factory: makes the writer for a remote ``directory`` (default: torch's ``SummaryWriter``).
    """

    name = "TensorBoard"
    # our own event file (or a SummaryWriter of our own, whose queue takes any thread's records); `flush`
    # also flushes the logger's SummaryWriter, which is safe from any thread too
    beside_training = True

    def __init__(
        self,
        directory: str | Path,
        histograms: bool = True,
        flush_also: Callable[[], Any] | None = None,
        writer_factory: Callable[[str], Any] | None = None,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`directory` must be a folder path (see `run_dir`), got {type(directory).__name__}.")
        self.directory = str(directory)
        self.wants_histograms = histograms
        self._flush_also = flush_also
        self._file: EventFile | None = None
        self._writer: Any = None
        if "://" in self.directory:
            if writer_factory is None:
                from torch.utils.tensorboard import SummaryWriter

                writer_factory = SummaryWriter
            self._writer = writer_factory(self.directory)
        else:
            self._file = EventFile(self.directory)

    def _summary(self, summary: Any, step: int) -> None:
        if self._file is not None:
            self._file.add_summary(summary, step)
        else:
            self._writer._get_file_writer().add_summary(summary, step)

    def image(self, tag: str, picture: Picture, step: int) -> None:
        self._summary(image_summary(tag, picture), step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if values:
            self._summary(scalars_summary(values), step)  # one record for all of this step's statistics

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        if self.wants_histograms:
            self._summary(histogram_summary(tag, histogram), step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self._summary(text_summary(tag, markdown), step)

    def probe_set(self, tag: str, blob: bytes, step: int) -> None:
        if self._file is not None:
            self._file.add_blob(tag, blob, step)  # the same record, the blob not copied
        else:
            self._summary(blob_summary(tag, blob), step)

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
        if charts:
            self._summary(layout_summary(charts), 0)

    @property
    def data_dir(self) -> Path | None:
        """Our run directory (data files sit beside our event file); ``None`` when remote."""
        return Path(self.directory) if self._file is not None else None

    @property
    def path(self) -> Path | None:
        """Our event file (``None`` for a remote directory)."""
        return self._file.path if self._file is not None else None

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        else:
            self._writer.flush()
        if self._flush_also is not None:
            self._flush_also()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._writer is not None:
            self._writer.close()
