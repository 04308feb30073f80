"""TensorBoard records without torch, TensorFlow or Lightning: image, scalar, histogram, text, Custom
Scalars and probe-set summaries, and an event file of our own with a fast CRC."""

from __future__ import annotations

import functools
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


def _blob_metadata() -> Any:
    plugin = SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=b'{"version": 1}')
    return SummaryMetadata(plugin_data=plugin, data_class=DataClass.DATA_CLASS_BLOB_SEQUENCE)


def _blob_shape() -> Any:
    return TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)])


def blob_summary(tag: str, blob: bytes) -> Any:
    """A TensorBoard ``Summary`` holding ``blob`` (a probe set) under ``tag`` for our plugin (``rnnviz``): a
    string tensor of shape ``[1]`` of data class ``BLOB_SEQUENCE``. The explicit data class lets the Rust data
    server keep it (it drops data of a plugin it does not know without one); either loader's data provider
    serves it as a blob sequence. (Our own event file writes the same record without this message:
    :func:`blob_event`.)"""
    tensor = TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=_blob_shape(), string_val=[bytes(blob)])
    return Summary(value=[Summary.Value(tag=tag, metadata=_blob_metadata(), tensor=tensor)])


# Protocol buffers' wire format, for the one record written without building its message (`blob_event`):
# a field's key is its number shifted left by 3 and its wire type (0 varint, 1 fixed 64-bit,
# 2 length-delimited).
_VARINT, _FIXED64, _DELIMITED = 0, 1, 2


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 takes ten bytes, as two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _delimited(number: int, size: int) -> bytes:
    """The key and length of a length-delimited field (bytes, string, message) of ``size`` bytes."""
    return _key(number, _DELIMITED) + _varint(size)


@functools.cache
def _blob_parts() -> tuple[bytes, bytes]:
    """The serialized metadata and shape that every probe-set record carries."""
    return _blob_metadata().SerializeToString(), _blob_shape().SerializeToString()


def blob_event(tag: str, blob: bytes, step: int, wall_time: float) -> tuple[bytes, bytes, bytes]:
    """The serialized ``Event`` of :func:`blob_summary`'s summary at ``step``, as ``(head, blob, tail)``: the
    three joined are the bytes ``SerializeToString`` gives, the blob itself never copied.

    A probe set is up to 2 MiB: built as messages, it was copied five times or so (into the tensor, the
    value, the summary, the event, the serialization), about 5 ms of the worker's time a recording, holding
    the GIL the training thread needs (fast-step, 2026-12-07). Here each message's fields are written in
    the order its serialization has them (by field number), around the blob.
    """
    metadata, shape = _blob_parts()
    tensor_head = (_key(1, _VARINT) + _varint(types_pb2.DT_STRING)  # TensorProto.dtype
                   + _delimited(2, len(shape)) + shape  # .tensor_shape
                   + _delimited(8, len(blob)))  # .string_val, then the blob
    name = tag.encode()
    tail = _delimited(9, len(metadata)) + metadata  # Summary.Value.metadata, after the tensor
    value_head = (_delimited(1, len(name)) + name  # Summary.Value.tag
                  + _delimited(8, len(tensor_head) + len(blob)) + tensor_head)  # .tensor
    value_size = len(value_head) + len(blob) + len(tail)
    summary_head = _delimited(1, value_size)  # Summary.value
    head = (_key(1, _FIXED64) + struct.pack("<d", wall_time)  # Event.wall_time
            + (_key(2, _VARINT) + _varint(int(step)) if step else b"")  # .step (proto3 leaves out a zero)
            + _delimited(5, len(summary_head) + value_size)  # .summary
            + summary_head + value_head)
    return head, blob, tail


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
    return _masked(google_crc32c.value(data))


def _masked(crc: int) -> bytes:
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

    def add_blob(self, tag: str, blob: bytes, step: int) -> None:
        """The record :meth:`add_summary` writes for ``blob_summary(tag, blob)``, without copying ``blob``:
        its pieces (:func:`blob_event`) go to the file one after the other, the CRC extended over them."""
        head, blob, tail = blob_event(tag, blob, step, time.time())
        header = struct.pack("<Q", len(head) + len(blob) + len(tail))
        crc = google_crc32c.extend(google_crc32c.extend(google_crc32c.value(head), blob), tail)
        self._file.write(header + masked_crc(header) + head)
        self._file.write(blob)  # one larger than the file's buffer is written through, without the GIL
        self._file.write(tail + _masked(crc))

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
