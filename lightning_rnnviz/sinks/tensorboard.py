"""TensorBoard: images, scalars and histograms through the logger's own ``SummaryWriter``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lightning_rnnviz.sinks.base import Sink
from lightning_rnnviz.sinks.events import EventFile, histogram_summary, image_summary, scalars_summary


class TensorBoardSink(Sink):
    """Images, histograms and scalars to an event file of our own in the logger's run directory
    (:class:`~lightning_rnnviz.sinks.events.EventFile`: TensorBoard's writer would spend about 25 ms of
    GIL per picture on a pure-Python CRC); TensorBoard shows them beside the logger's own scalars.

    Args:
        writer: the logger's ``torch.utils.tensorboard.SummaryWriter``; flushed, never closed, here.
        histograms: also write histograms (TensorBoard's distributions view).
        own_file: write to our own event file; ``None`` does so when the run directory is a local
            folder (a remote one such as ``s3://`` goes through ``writer``).
    """

    def __init__(self, writer: Any, histograms: bool = True, own_file: bool | None = None) -> None:
        self.writer = writer
        self.histograms = histograms
        log_dir = str(writer.get_logdir())
        if own_file is None:
            own_file = "://" not in log_dir
        self._file: EventFile | None = EventFile(log_dir) if own_file else None

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        if self._file is not None:
            self._file.add_summary(image_summary(tag, rgb), step)
        else:
            self.writer.add_image(tag, rgb, global_step=step, dataformats="HWC")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._file is not None:  # one record for all of this step's statistics
            self._file.add_summary(scalars_summary(values), step)
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def histogram(self, tag: str, values: Callable[[], np.ndarray], step: int) -> None:
        if not self.histograms:
            return
        data = values()
        finite = np.isfinite(data)
        if not finite.all():
            data = data[finite]  # non-finite values are left out (the figures mark them)
        if not data.size:
            return
        if self._file is not None:
            self._file.add_summary(histogram_summary(tag, data), step)
        else:
            self.writer.add_histogram(tag, data, global_step=step)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        self.writer.flush()  # the user's scalars of this step appear together with the pictures

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
