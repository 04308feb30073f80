"""Sinks: safe names, PNG files that cannot escape their folder, our PNG encoder and event file, TensorBoard
writes read back."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_rnnviz.sinks import FileSink, Picture, TensorBoardSink, run_dir, safe_name
from lightning_rnnviz.sinks.events import EventFile, histogram_summary, image_summary
from lightning_rnnviz.sinks.png import encode_png
from tests.helpers.events import tag_kinds
from tests.helpers.histograms import numpy_histogram


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("encoder.rnn", "encoder.rnn"),
        ("", "root"),
        ("decoder.layers.0.self_attn", "decoder.layers.0.self_attn"),
        ("../../etc/passwd", "_._._._._etc_passwd"),
        ("a/b\\c d", "a_b_c_d"),
        ("..", "_._._"),
        ("blocks.héllo", "blocks.h_llo"),
    ],
)
def test_safe_name(name, expected):
    assert safe_name(name) == expected
    assert "/" not in safe_name(name) and ".." not in safe_name(name)


def test_file_sink_writes_png_and_scalars(tmp_path):
    logged = []
    sink = FileSink(tmp_path / "rnnviz", lambda metrics, step: logged.append((metrics, step)))
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    sink.image(f"rnnviz/hidden/{safe_name('../evil')}", Picture.from_rgb(rgb), 7)
    path = tmp_path / "rnnviz" / "hidden" / "_._._evil" / "step_7.png"
    assert np.array_equal(np.asarray(Image.open(path)), rgb)
    sink.scalars({"rnnviz/hidden/m/mean_abs": 0.5}, 7)
    assert logged == [({"rnnviz/hidden/m/mean_abs": 0.5}, 7)]


def test_file_sink_refuses_paths_outside_its_folder(tmp_path):
    sink = FileSink(tmp_path / "rnnviz")
    with pytest.raises(ValueError, match="outside"):
        sink.image("rnnviz/../../escape", Picture.from_rgb(np.zeros((2, 2, 3), np.uint8)), 0)


def test_tensorboard_sink_round_trip(tmp_path):
    flushed = []
    sink = TensorBoardSink(run_dir(tmp_path), flush_also=lambda: flushed.append(1))
    sink.image("rnnviz/hidden/m", Picture.from_rgb(np.full((10, 12, 3), 128, np.uint8)), 3)
    sink.scalars({"rnnviz/hidden/m/mean_abs": 0.25}, 3)
    sink.histogram("rnnviz/hidden_dist/m", numpy_histogram(np.array([0.1, np.nan, 0.3, np.inf])), 3)
    sink.text("rnnviz/findings", "| a | b |\n|---|---|\n| 1 | 2 |", 3)
    sink.layout({"rnnviz: m": {"hidden": ["rnnviz/hidden/m/.*"]}})
    sink.flush()
    assert flushed == [1]  # the logger's own writer is flushed with ours
    acc = EventAccumulator(str(tmp_path / "rnnviz"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    image = acc.Images("rnnviz/hidden/m")[0]
    assert (image.step, image.width, image.height) == (3, 12, 10)
    assert acc.Scalars("rnnviz/hidden/m/mean_abs")[0].value == pytest.approx(0.25)
    histogram = acc.Histograms("rnnviz/hidden_dist/m")[0]
    assert histogram.histogram_value.num == 2  # non-finite values are left out of histograms
    assert acc.Tensors("rnnviz/findings")[0].tensor_proto.string_val == [b"| a | b |\n|---|---|\n| 1 | 2 |"]
    assert tag_kinds(tmp_path) == {
        ("rnnviz", "rnnviz/hidden/m"): {"images"},
        ("rnnviz", "rnnviz/hidden/m/mean_abs"): {"scalars"},
        ("rnnviz", "rnnviz/hidden_dist/m"): {"histograms"},
        ("rnnviz", "rnnviz/findings"): {"text"},
        ("rnnviz", "custom_scalars__config__"): {"custom_scalars"},
    }
    sink.close()


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (450, 800, 3)])
def test_png_encoder_round_trips_exactly(shape):
    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(rgb))).convert("RGB"))
    np.testing.assert_array_equal(decoded, rgb)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3))])
def test_png_encoder_refuses_other_layouts(bad):
    with pytest.raises(ValueError, match="uint8"):
        encode_png(bad)


def test_event_file_records_carry_tensorboards_own_crc(tmp_path):
    """Every record of our event file passes the checksum TensorBoard's own (pure Python) code computes."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    events = EventFile(tmp_path)
    events.add_summary(image_summary("rnnviz/hidden/m", Picture.from_rgb(np.zeros((3, 4, 3), np.uint8))), 5)
    events.add_summary(histogram_summary("rnnviz/gates_dist/m/input", numpy_histogram(np.linspace(0, 1, 101))), 5)
    events.add_blob("rnnviz/probe_set/train", bytes(range(256)) * 4000, 5)  # written in pieces
    events.close()
    data = events.path.read_bytes()
    records = 0
    while data:
        header, header_crc = data[:8], struct.unpack("<I", data[8:12])[0]
        (length,) = struct.unpack("<Q", header)
        body, body_crc = data[12 : 12 + length], struct.unpack("<I", data[12 + length : 16 + length])[0]
        assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body)
        data = data[16 + length :]
        records += 1
    assert records == 4  # the file-version record, the image, the histogram, the probe set


def test_histogram_summary_counts_every_value_once():
    values = np.concatenate([np.zeros(10), np.ones(5), np.linspace(0, 1, 85)]).astype(np.float32)
    histogram = histogram_summary("t", numpy_histogram(values, bins=10)).value[0].histo
    assert sum(histogram.bucket) == 100 and histogram.num == 100
    assert histogram.min == 0.0 and histogram.max == 1.0 and histogram.bucket_limit[-1] == 1.0
    assert histogram.sum == pytest.approx(float(values.astype(np.float64).sum()))
    assert histogram.sum_squares == pytest.approx(float((values.astype(np.float64) ** 2).sum()))
    constant = histogram_summary("t", numpy_histogram(np.full(7, 0.5))).value[0].histo
    assert list(constant.bucket) == [7.0] and constant.min == constant.max == 0.5


def test_tensorboard_sink_writes_a_run_of_its_own_never_beside_another_writer(tmp_path):
    """TensorBoard's Python loader follows only the last event file of a directory: ours lives in a directory
    of its own (a run of its own), so neither the logger's scalars nor our pictures freeze."""
    writer = SummaryWriter(tmp_path)
    writer.add_scalar("train_loss", 1.0, 0)
    sink = TensorBoardSink(run_dir(writer.get_logdir()))
    sink.image("rnnviz/hidden/m", Picture.from_rgb(np.zeros((5, 5, 3), np.uint8)), 1)
    sink.close()
    writer.close()
    assert len(list(tmp_path.glob("*tfevents*"))) == 1  # the logger's alone
    assert sink.path.parent == tmp_path / "rnnviz" and len(list((tmp_path / "rnnviz").iterdir())) == 1


def test_remote_directories_go_through_a_summary_writer_of_their_own():
    made = []

    class FakeWriter:
        def __init__(self, directory):
            made.append(directory)
            self.summaries = []

        def _get_file_writer(self):
            return self

        def add_summary(self, summary, step):
            self.summaries.append((summary.value[0].tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    sink = TensorBoardSink(run_dir("s3://bucket/logs/version_0"), writer_factory=FakeWriter)
    sink.image("rnnviz/hidden/m", Picture.from_rgb(np.zeros((5, 5, 3), np.uint8)), 2)
    sink.close()
    assert made == ["s3://bucket/logs/version_0/rnnviz"] and sink.path is None
    assert sink._writer.summaries == [("rnnviz/hidden/m", 2)]


def test_picture_decodes_its_png_only_when_asked():
    rgb = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    picture = Picture.from_rgb(rgb)
    assert (picture.width, picture.height) == (9, 6) and picture.rgb() is rgb
    np.testing.assert_array_equal(Picture(picture.png, 9, 6).rgb(), rgb)
