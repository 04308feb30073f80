"""TensorBoard records without torch, TensorFlow or Lightning: image, scalar, histogram, text, Custom
Scalars and probe-set summaries, and an event file of our own with a fast CRC."""

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
from tensorboard.compat.proto import types_pb2
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import DataClass, HistogramProto, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

from lightning_rnnviz.names import PLUGIN_NAME
from lightning_rnnviz.sinks.base import Histogram, Picture


def image_summary(tag: str, picture: Picture) -> Any:
    """A TensorBoard ``Summary`` holding ``picture`` (PNG) as an image under ``tag``."""
    image = Summary.Image(height=picture.height, width=picture.width, colorspace=3,
                          encoded_image_string=picture.png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def scalars_summary(values: Mapping[str, float]) -> Any:
    """A TensorBoard ``Summary`` holding each ``tag -> value`` as a scalar."""
    return Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])


def histogram_summary(tag: str, histogram: Histogram) -> Any:
    """A TensorBoard ``Summary`` holding ``histogram``'s buckets under ``tag``."""
    proto = HistogramProto(
        min=histogram.min,
        max=histogram.max,
        num=histogram.num,
        sum=histogram.sum,
        sum_squares=histogram.sum_squares,
        bucket_limit=histogram.limits.tolist(),
        bucket=histogram.counts.tolist(),
    )
    return Summary(value=[Summary.Value(tag=tag, histo=proto)])


def _string_tensor(data: bytes) -> Any:
    return TensorProto(dtype=types_pb2.DT_STRING, string_val=[data], tensor_shape=TensorShapeProto())


def text_summary(tag: str, markdown: str) -> Any:
    """A TensorBoard ``Summary`` for the Text dashboard (which renders markdown, tables included)."""
    from tensorboard.plugins.text import metadata

    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(tag, ""),
                                        tensor=_string_tensor(markdown.encode()))])


def blob_summary(tag: str, blob: bytes) -> Any:
    """A TensorBoard ``Summary`` holding ``blob`` (a probe set) under ``tag`` for our plugin (``rnnviz``): a
    string tensor of shape ``[1]`` of data class ``BLOB_SEQUENCE``. The explicit data class lets the Rust data
    server keep it (it drops data of a plugin it does not know without one); either loader's data provider
    serves it as a blob sequence."""
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                      content=b'{"version": 1}'),
                               data_class=DataClass.DATA_CLASS_BLOB_SEQUENCE)
    shape = TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)])
    tensor = TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=[bytes(blob)])
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


def layout_summary(charts: Mapping[str, Mapping[str, list[str]]]) -> Any:
    """A TensorBoard ``Summary`` with a Custom Scalars layout: one category per key, one multi-line chart per
    ``title -> [tag regex, ...]``."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    layout = layout_pb2.Layout(category=[
        layout_pb2.Category(title=category, chart=[
            layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))
            for title, regexes in group.items()
        ])
        for category, group in charts.items()
    ])
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, metadata=metadata.create_summary_metadata(),
                                        tensor=_string_tensor(layout.SerializeToString()))])


def masked_crc(data: bytes) -> bytes:
    """The masked CRC32C of TFRecord framing (google-crc32c's C code: 1000x TensorBoard's pure Python)."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class EventFile:
    """An append-only TensorBoard event file of our own, written on the calling thread.

    TensorBoard's own writer frames each record with a CRC computed in pure Python (about 25 ms for one
    80 kB picture) on a background thread that holds the GIL while it does so; here the CRC costs
    microseconds and the write goes to the page cache.

    TensorBoard wants one writer per run directory: its Python loader follows only the lexicographically
    last event file of a directory and never returns to an earlier one. So this file lives in a directory
    of its own (``<logger run>/rnnviz``, a run of its own in TensorBoard), never beside another writer's.

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
        self._file.write(header + masked_crc(header) + data + masked_crc(data))

    def add_summary(self, summary: Any, step: int) -> None:
        self._write(Event(summary=summary, step=int(step), wall_time=time.time()))

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
