import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from lightning_rnnviz.render import common, figure_to_png, figure_to_rgb, row_suffix

RENDER_DIR = Path(common.__file__).parent
REPO_ROOT = RENDER_DIR.parents[1]


@pytest.mark.parametrize(
    ("layers", "directions", "expected"),
    [
        (1, 1, [""]),
        (2, 1, ["/layer0", "/layer1"]),
        (1, 2, ["/layer0", "/layer0_reverse"]),
        (2, 2, ["/layer0", "/layer0_reverse", "/layer1", "/layer1_reverse"]),
    ],
)
def test_row_suffix(rnn_record, layers, directions, expected):
    record = rnn_record(layers=layers, directions=directions)
    assert [row_suffix(record, i) for i in range(layers * directions)] == expected


def test_row_suffix_out_of_range(rnn_record):
    with pytest.raises(IndexError, match="out of range for 2 layer"):
        row_suffix(rnn_record(layers=2), 2)


def test_bin_axis_means_with_short_last_bin():
    values = np.arange(10, dtype=np.float32)[None]  # 0..9 in bins of 3: [0,1,2] [3,4,5] [6,7,8] [9]
    binned, width = common.bin_axis(values, max_bins=4)
    assert width == 3
    np.testing.assert_allclose(binned[0], [1.0, 4.0, 7.0, 9.0])


def test_bin_axis_sum_and_axis():
    values = np.ones((2, 7, 3))
    binned, width = common.bin_axis(values, max_bins=3, axis=1, reduce="sum")
    assert width == 3 and binned.shape == (2, 3, 3)
    np.testing.assert_allclose(binned[0, :, 0], [3.0, 3.0, 1.0])


def test_bin_axis_keeps_nonfinite_visible_without_warnings():
    values = np.array([[1.0, np.inf, -np.inf, 2.0, np.nan, 3.0, 4.0, 5.0]])
    binned, width = common.bin_axis(values, max_bins=4)
    assert width == 2
    assert binned[0, 0] == np.inf and binned[0, 1] == -np.inf and np.isnan(binned[0, 2])
    np.testing.assert_allclose(binned[0, 3], 4.5)
    mixed, _ = common.bin_axis(np.array([np.inf, -np.inf, 1.0]), max_bins=2)
    assert np.isnan(mixed[0])


def test_bin_axis_no_binning_needed():
    values = np.arange(5.0)
    binned, width = common.bin_axis(values, max_bins=5)
    assert width == 1 and binned is values


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 3000), max_bins=st.integers(1, 300))
def test_bin_axis_bounded_and_preserves_total(length, max_bins):
    values = np.random.default_rng(length).random((1, length))
    binned, width = common.bin_axis(values, max_bins, reduce="sum")
    assert binned.shape[1] <= max_bins
    assert binned.shape[1] == -(-length // width)
    np.testing.assert_allclose(binned.sum(), values.sum(), rtol=1e-4)


def test_tick_positions_thinned():
    assert list(common.tick_positions(10, 20)) == list(range(10))
    ticks = common.tick_positions(100, 30)
    assert len(ticks) <= 30 and ticks[0] == 0 and np.all(np.diff(ticks) == 4)


def test_nonfinite_flag():
    assert common.nonfinite_flag(np.zeros(3), None) == ""
    assert common.nonfinite_flag(np.array([np.nan])) == "NaN"
    assert common.nonfinite_flag(np.array([np.inf]), np.zeros(0)) == "Inf"
    assert common.nonfinite_flag(np.array([np.inf]), np.array([np.nan])) == "NaN and Inf"


def test_compose_title():
    payload = {"exact": False, "notes": ("inter-layer dropout was active in training mode",)}
    title = common.compose_title("m: hidden", payload, step=7, nonfinite="NaN")
    first, second = title.split("\n")
    assert "step 7" in first and "contains NaN" in first
    assert second.startswith("(approximate: inter-layer dropout")
    assert common.compose_title("a$b", {"exact": True}) == r"a\$b"


def test_tanh_bounded_kinds(rnn_record):
    assert common.hidden_is_tanh_bounded(rnn_record("LSTM"))
    assert common.hidden_is_tanh_bounded(rnn_record("GRU"))
    assert common.hidden_is_tanh_bounded(rnn_record("RNN_TANH"))
    assert not common.hidden_is_tanh_bounded(rnn_record("RNN_RELU"))
    projected = rnn_record("LSTM", hidden=8)
    projected.hidden = projected.hidden[..., :4]  # proj_size 4 < hidden_size 8
    assert not common.hidden_is_tanh_bounded(projected)
    cell = rnn_record("RNNCell")
    assert common.hidden_is_tanh_bounded(cell)
    cell.hidden = cell.hidden.abs() * 3  # a ReLU cell: non-negative, unbounded
    assert not common.hidden_is_tanh_bounded(cell)


def test_figure_to_rgb_and_png():
    fig = Figure(figsize=(3, 2), dpi=100)
    fig.add_subplot().plot([0, 1], [1, 0])
    rgb = figure_to_rgb(fig)
    assert rgb.shape == (200, 300, 3) and rgb.dtype == np.uint8 and rgb.flags["C_CONTIGUOUS"]
    png = figure_to_png(fig)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 1000 < len(png) < 50_000


def test_package_never_imports_pyplot():
    # The top-level package imports the callbacks, hence pytorch_lightning, whose torchmetrics imports
    # pyplot itself; stub the top-level package so that only render (and probe) are measured.
    script = textwrap.dedent(
        """
        import sys, types
        package = types.ModuleType("lightning_rnnviz")
        package.__path__ = [sys.argv[1]]
        sys.modules["lightning_rnnviz"] = package
        import torch
        from lightning_rnnviz import render
        from lightning_rnnviz.probe.records import AttentionRecord, RNNRecord
        h = torch.rand(2, 2, 12, 6) - 0.5
        gates = {g: torch.rand(2, 2, 12, 6) for g in ("reset", "update", "new")}
        rec = RNNRecord("gru", "GRU", h, gates, h.clone(), None, None, torch.tensor([12, 9]), num_layers=2)
        att = AttentionRecord("att", "MultiheadAttention", torch.rand(2, 3, 5, 7).softmax(-1))
        figs = [
            render.draw_hidden(render.reduce_hidden(rec)),
            render.draw_gates(render.reduce_gates(rec)),
            render.draw_grad_norm(render.reduce_grad_norm(rec)),
            render.draw_grad_decay({0: rec.grad_norm, 1: rec.grad_norm}, "gru", ["layer 0", "layer 1"]),
            render.draw_attention(render.reduce_attention(att)),
        ]
        for fig in figs:
            render.figure_to_rgb(fig)
            render.figure_to_png(fig)
        render.hidden_stats(rec), render.gate_stats(rec), render.grad_stats(rec), render.attention_stats(att)
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert "pytorch_lightning" not in sys.modules, "the stub did not isolate render"
        print("ok")
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", script, str(RENDER_DIR.parent)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


ALLOWED_THIRD_PARTY = {"torch", "numpy", "matplotlib", "PIL"}


@pytest.mark.parametrize("path", sorted(RENDER_DIR.glob("*.py")), ids=lambda p: p.name)
def test_render_imports_only_allowed_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert not (node.func.attr == "use" and getattr(node.func.value, "id", "") == "matplotlib")
            continue
        for module in modules:
            top = module.split(".")[0]
            assert "pyplot" not in module
            ok = (
                top in ALLOWED_THIRD_PARTY
                or top in sys.stdlib_module_names
                or module in ("lightning_rnnviz.probe.records", "lightning_rnnviz.probe.held", "lightning_rnnviz.names",
                              "lightning_rnnviz.payload")
                or module.startswith("lightning_rnnviz.render")
            )
            assert ok, f"{path.name} imports {module}"


def test_row_suffix_used_for_every_rnn_statistic(rnn_record):
    from lightning_rnnviz.render import gate_stats, grad_stats, hidden_stats

    record = rnn_record("GRU", layers=2, directions=2)
    for stats in (hidden_stats(record), gate_stats(record), grad_stats(record)):
        suffixes = {name.split("/", 1)[1] for name in stats}
        assert suffixes == {"layer0", "layer0_reverse", "layer1", "layer1_reverse"}
    single = rnn_record("GRU")
    for stats in (hidden_stats(single), gate_stats(single), grad_stats(single)):
        assert stats and not any("/" in name for name in stats)


@given(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.1, 0.9, 0.95, 1.0, float("nan"), float("inf")]), min_size=0,
                max_size=60), st.sampled_from([0.0, 0.1, 0.95]))
@settings(max_examples=60, deadline=None)
def test_indicator_counts_like_a_bool_comparison(values, threshold):
    import torch

    x = torch.tensor(values, dtype=torch.float32)
    for compare in (torch.lt, torch.gt):
        ones = common.indicator(x, compare, threshold)
        assert ones.dtype == torch.float32
        assert torch.equal(ones.bool(), compare(x, threshold))
        assert int(common.exact_count(ones)) == int(compare(x, threshold).sum())
    grid = x[: len(values) // 6 * 6].reshape(-1, 6)
    if grid.numel():
        assert torch.equal(common.exact_count(common.indicator(grid, torch.gt, threshold), 0),
                           (grid > threshold).sum(0).float())


def test_exact_count_past_float32_integers():
    import torch

    ones = torch.ones(2**24 + 1)  # float32 stops counting at 2**24 (16777216 + 1 rounds back to 16777216)
    assert int(common.exact_count(ones)) == 2**24 + 1
    assert int(common.exact_count(ones.view(1, -1), 1)[0]) == 2**24 + 1
