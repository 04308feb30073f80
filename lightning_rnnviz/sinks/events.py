"""A TensorBoard image writer that needs neither torch nor Lightning (used by the drawing process)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_rnnviz.sinks.base import Sink


class EventImageSink(Sink):
    """Writes images to an event file of its own in ``log_dir``; TensorBoard merges every event file of
    a run directory, so they show beside the logger's own scalars.

    Args:
        log_dir: the run directory (the logger's ``SummaryWriter.get_logdir()``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(str(log_dir), flush_secs=10, filename_suffix=".rnnviz")

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        height, width = rgb.shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])
        self._writer.add_event(Event(summary=summary, step=step, wall_time=time.time()))

    def scalars(self, values, step):  # noqa: ANN001 - scalars stay with the logger in the main process
        raise NotImplementedError("EventImageSink writes images only")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
