"""TensorBoard records without torch or Lightning: image and histogram summaries, and an event file of our
own with a fast CRC (used by the training process and by the drawing process)."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from lightning_rnnviz.sinks.base import Sink
from lightning_rnnviz.sinks.png import encode_png


def image_summary(tag: str, rgb: np.ndarray) -> Any:
    """A TensorBoard ``Summary`` holding ``rgb`` as a PNG image under ``tag``."""
    height, width = rgb.shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encode_png(rgb))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def scalars_summary(values: Mapping[str, float]) -> Any:
    """A TensorBoard ``Summary`` holding each ``tag -> value`` as a scalar."""
    return Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])


def histogram_summary(tag: str, values: np.ndarray, bins: int = 64) -> Any:
    """A TensorBoard ``Summary`` holding the histogram of the finite, non-empty ``values`` in ``bins``
    equal buckets between their minimum and maximum (the last bucket includes the maximum)."""
    values = np.asarray(values, dtype=np.float32).ravel()
    low, high = float(values.min()), float(values.max())
    if high > low:
        counts, edges = np.histogram(values, bins=bins, range=(low, high))
        limits = edges[1:]
    else:
        counts, limits = np.array([values.size]), np.array([high])
    wide = values.astype(np.float64)
    histogram = HistogramProto(
        min=low,
        max=high,
        num=float(values.size),
        sum=float(wide.sum()),
        sum_squares=float(np.dot(wide, wide)),
        bucket_limit=limits.tolist(),
        bucket=counts.astype(np.float64).tolist(),
    )
    return Summary(value=[Summary.Value(tag=tag, histo=histogram)])


def _masked_crc(data: bytes) -> bytes:
    """The masked CRC32C of TFRecord framing (google-crc32c's C code: 1000x TensorBoard's pure Python)."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class EventFile:
    """An append-only TensorBoard event file of our own, written on the calling thread.

    TensorBoard's own writer frames each record with a CRC computed in pure Python (about 25 ms for one
    80 kB picture) on a background thread that holds the GIL while it does so; here the CRC costs
    microseconds and the write goes to the page cache. TensorBoard reads every ``*tfevents*`` file of a
    run directory, so these records show beside the logger's own.

    Args:
        log_dir: the run directory.
        suffix: appended to the file name, after TensorBoard's usual ``events.out.tfevents.<time>.<host>``.
    """

    _counter = itertools.count()

    def __init__(self, log_dir: str | Path, suffix: str = ".rnnviz") -> None:
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}."
                f"{next(self._counter)}{suffix}")
        self.path = folder / name
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in `close`
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: Any) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + _masked_crc(header) + data + _masked_crc(data))

    def add_summary(self, summary: Any, step: int) -> None:
        self._write(Event(summary=summary, step=int(step), wall_time=time.time()))

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class EventImageSink(Sink):
    """Writes images to an event file of its own in ``log_dir`` (used by the drawing process).

    Args:
        log_dir: the run directory (the logger's ``SummaryWriter.get_logdir()``).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self._file = EventFile(log_dir)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self._file.add_summary(image_summary(tag, rgb), step)

    def scalars(self, values, step):  # noqa: ANN001 - scalars stay with the logger in the main process
        raise NotImplementedError("EventImageSink writes images only")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
