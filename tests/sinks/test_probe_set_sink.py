"""Probe sets in TensorBoard (issue 25): summaries of our plugin ``rnnviz`` with the blob-sequence data class,
read back by TensorBoard's own reader and data provider; every other sink ignores them."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import DataClass

from lightning_rnnviz.names import PLUGIN_NAME, PROBE_SET_TAG
from lightning_rnnviz.payload import Packer, unpack
from lightning_rnnviz.pipeline.drawing import InlineRenderer
from lightning_rnnviz.pipeline.fanout import Fanout
from lightning_rnnviz.render.report import Guard
from lightning_rnnviz.sinks import FileSink, TensorBoardSink, run_dir
from lightning_rnnviz.sinks.base import Sink
from lightning_rnnviz.sinks.events import EventFile, blob_event, blob_summary
from lightning_rnnviz.sinks.mlflow import MLflowSink
from lightning_rnnviz.sinks.wandb import WandbSink

TAG = f"{PROBE_SET_TAG}/train"


def _blob(step: int, size: int = 10) -> bytes:
    packer = Packer()
    header = {"step": step, "hidden": packer.add(np.arange(size, dtype=np.float32) + step)}
    return packer.finish(header)


def test_blob_summary_is_a_string_tensor_of_our_plugin_with_the_blob_sequence_class():
    blob = _blob(3)
    value = blob_summary(TAG, blob).value[0]
    assert value.tag == TAG
    assert value.metadata.plugin_data.plugin_name == PLUGIN_NAME == "rnnviz"
    assert value.metadata.plugin_data.content == b'{"version": 1}'
    assert value.metadata.data_class == DataClass.DATA_CLASS_BLOB_SEQUENCE
    assert [d.size for d in value.tensor.tensor_shape.dim] == [1]
    assert list(value.tensor.string_val) == [blob]


@pytest.mark.parametrize("step", [0, 7, 2**40, -1])
@pytest.mark.parametrize("size", [0, 10, 300_000])
def test_our_event_file_writes_the_record_protobuf_would_without_copying_the_blob(tmp_path, step, size):
    """The record's pieces, joined, are the bytes of the ``Event`` built from :func:`blob_summary`; the
    blob is the very object given (never copied); the file holds that record."""
    blob = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    head, middle, tail = blob_event(TAG, blob, step, 1234.5)
    assert middle is blob
    expected = Event(summary=blob_summary(TAG, blob), step=step, wall_time=1234.5).SerializeToString()
    assert head + middle + tail == expected
    events = EventFile(tmp_path)
    events.add_blob(TAG, blob, step)
    events.close()
    (record,) = [e for e in EventFileLoader(str(events.path)).Load() if e.HasField("summary")]
    assert record.step == step and list(record.summary.value[0].tensor.string_val) == [blob]
    assert record.summary == blob_summary(TAG, blob)


def test_tensorboard_reads_the_probe_sets_back(tmp_path):
    directory = run_dir(tmp_path)
    sink = TensorBoardSink(directory)
    blobs = {step: _blob(step, 1000 + step) for step in (0, 5, 9)}
    for step, blob in blobs.items():
        sink.probe_set(TAG, blob, step)
    sink.probe_set(f"{PROBE_SET_TAG}/val", blobs[5], 5)
    sink.flush()
    sink.close()
    # the event accumulator (every tensor kept)
    acc = EventAccumulator(directory, size_guidance={"tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["tensors"]) == [TAG, f"{PROBE_SET_TAG}/val"]
    assert acc.SummaryMetadata(TAG).plugin_data.plugin_name == "rnnviz"
    events = acc.Tensors(TAG)
    assert [e.step for e in events] == [0, 5, 9]
    for event in events:
        (raw,) = event.tensor_proto.string_val
        header, array = unpack(raw)
        assert raw == blobs[event.step] and header["step"] == event.step
        np.testing.assert_array_equal(array(header["hidden"]), np.arange(1000 + event.step) + event.step)
    # the data provider, as our plugin reads it (both loaders serve it through one)
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={PLUGIN_NAME: 0})
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    ctx = context.RequestContext()
    listed = provider.list_blob_sequences(ctx, experiment_id="", plugin_name=PLUGIN_NAME)
    assert sorted(listed) == ["rnnviz"] and sorted(listed["rnnviz"]) == [TAG, f"{PROBE_SET_TAG}/val"]
    read = provider.read_blob_sequences(ctx, experiment_id="", plugin_name=PLUGIN_NAME,
                                        downsample=100)["rnnviz"][TAG]
    assert [d.step for d in read] == [0, 5, 9]
    for datum in read:
        (ref,) = datum.values
        assert provider.read_blob(ctx, blob_key=ref.blob_key) == blobs[datum.step]


def test_a_remote_directory_writes_the_same_summary_through_its_summary_writer():
    written = []

    class FakeWriter:
        def __init__(self, directory):
            pass

        def _get_file_writer(self):
            return self

        def add_summary(self, summary, step):
            written.append((summary, step))

        def flush(self):
            pass

        def close(self):
            pass

    sink = TensorBoardSink(run_dir("s3://bucket/logs/version_0"), writer_factory=FakeWriter)
    blob = _blob(2)
    sink.probe_set(TAG, blob, 2)
    assert written == [(blob_summary(TAG, blob), 2)]


def test_the_other_sinks_ignore_probe_sets(tmp_path):
    for cls in (FileSink, MLflowSink, WandbSink):
        assert cls.probe_set is Sink.probe_set  # the no-op
    files = FileSink(tmp_path / "files")
    tensorboard = TensorBoardSink(run_dir(tmp_path / "tb"))
    guard = Guard("test", strict=True)
    fanout = Fanout([files, tensorboard], InlineRenderer(), guard)
    blob = _blob(1)
    fanout.probe_set(TAG, blob, 1)
    fanout.probe_set(TAG, _blob(99), 1)  # a second monitor's, same step: the first one's stays
    fanout.flush()
    assert not guard.counts
    assert not [path for path in tmp_path.rglob("*") if "probe" in path.name]
    acc = EventAccumulator(run_dir(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.tensor_proto.string_val[0] for e in acc.Tensors(TAG)] == [blob]
    fanout.close()


@pytest.mark.parametrize("beside", [True, False])
def test_the_workers_delivery_carries_the_probe_set_to_tensorboard(tmp_path, beside):
    from lightning_rnnviz.pipeline.worker import Delivery

    tensorboard = TensorBoardSink(run_dir(tmp_path))
    tensorboard.beside_training = beside
    fanout = Fanout([tensorboard], InlineRenderer(), Guard("test", strict=True))
    delivery = Delivery(4)
    blob = _blob(4)
    delivery.probe_set(TAG, blob, 4)
    delivery.probe_set(TAG, _blob(5), 4)  # a second monitor's: dropped
    fanout.deliver(delivery.items, beside_training=True)
    fanout.deliver(delivery.items, beside_training=False)
    fanout.flush()
    acc = EventAccumulator(run_dir(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert [(e.step, e.tensor_proto.string_val[0]) for e in acc.Tensors(TAG)] == [(4, blob)]
    fanout.close()
