"""Sinks: safe names, PNG files that cannot escape their folder, TensorBoard writes read back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_rnnviz.sinks import FileSink, TensorBoardSink, safe_name


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
    sink.image(f"rnnviz/hidden/{safe_name('../evil')}", rgb, 7)
    path = tmp_path / "rnnviz" / "hidden" / "_._._evil" / "step_7.png"
    assert np.array_equal(np.asarray(Image.open(path)), rgb)
    sink.scalars({"rnnviz/hidden/m/mean_abs": 0.5}, 7)
    assert logged == [({"rnnviz/hidden/m/mean_abs": 0.5}, 7)]


def test_file_sink_refuses_paths_outside_its_folder(tmp_path):
    sink = FileSink(tmp_path / "rnnviz")
    with pytest.raises(ValueError, match="outside"):
        sink.image("rnnviz/../../escape", np.zeros((2, 2, 3), np.uint8), 0)


def test_tensorboard_sink_round_trip(tmp_path):
    writer = SummaryWriter(tmp_path)
    sink = TensorBoardSink(writer)
    sink.image("rnnviz/hidden/m", np.full((10, 12, 3), 128, np.uint8), 3)
    sink.scalars({"rnnviz/hidden/m/mean_abs": 0.25}, 3)
    sink.histogram("rnnviz/hidden/m", lambda: np.array([0.1, np.nan, 0.3, np.inf]), 3)
    sink.flush()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    image = acc.Images("rnnviz/hidden/m")[0]
    assert (image.step, image.width, image.height) == (3, 12, 10)
    assert acc.Scalars("rnnviz/hidden/m/mean_abs")[0].value == pytest.approx(0.25)
    histogram = acc.Histograms("rnnviz/hidden/m")[0]
    assert histogram.histogram_value.num == 2  # non-finite values are left out of histograms
    writer.close()


def test_histograms_can_be_switched_off(tmp_path):
    calls = []
    sink = TensorBoardSink(SummaryWriter(tmp_path), histograms=False)
    sink.histogram("rnnviz/hidden/m", lambda: calls.append(1) or np.ones(3), 0)
    assert calls == []
