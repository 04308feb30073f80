"""TensorBoard: images, scalars and histograms through the logger's own ``SummaryWriter``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lightning_rnnviz.sinks.base import Sink


class TensorBoardSink(Sink):
    """Writes through a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``).

    Args:
        writer: the summary writer; it belongs to the logger and is flushed, never closed, here.
        histograms: also write histograms (TensorBoard's distributions view).
    """

    def __init__(self, writer: Any, histograms: bool = True) -> None:
        self.writer = writer
        self.histograms = histograms

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, global_step=step, dataformats="HWC")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def histogram(self, tag: str, values: Callable[[], np.ndarray], step: int) -> None:
        if self.histograms:
            data = values()
            data = data[np.isfinite(data)]
            if data.size:
                self.writer.add_histogram(tag, data, global_step=step)

    def flush(self) -> None:
        self.writer.flush()
