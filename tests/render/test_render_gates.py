import numpy as np
import pytest
import torch
from matplotlib.text import Text

from lightning_rnnviz.probe.records import LSTM_GATES, RNNRecord
from lightning_rnnviz.render import draw_gates, figure_to_png, figure_to_rgb, gate_stats, reduce_gates


def tiny_lstm() -> RNNRecord:
    """One row, sequences of lengths 2 and 1, two units; the padded step holds saturated junk."""
    gates = {name: torch.full((1, 2, 2, 2), 0.5) for name in LSTM_GATES}
    gates["forget"][0] = torch.tensor([[[0.05, 0.5], [0.95, 0.95]], [[0.02, 0.91], [0.99, 0.99]]])
    gates["cell"][0] = torch.tensor([[[-0.95, 0.0], [0.95, 0.5]], [[-0.85, 0.92], [-0.99, -0.99]]])
    hidden = torch.zeros(1, 2, 2, 2)
    return RNNRecord("lstm", "LSTM", hidden, gates, None, torch.zeros(1, 2, 2, 2), None, torch.tensor([2, 1]))


def test_gate_stats_exact():
    stats = gate_stats(tiny_lstm())
    assert set(stats) == {f"{g}_{s}" for g in LSTM_GATES for s in ("mean", "saturated_low", "saturated_high")}
    assert stats["forget_mean"] == pytest.approx((0.05 + 0.5 + 0.95 + 0.95 + 0.02 + 0.91) / 6)
    assert stats["forget_saturated_low"] == pytest.approx(2 / 6)
    assert stats["forget_saturated_high"] == pytest.approx(3 / 6)
    # tanh candidate: saturated within 0.1 of -1 / +1
    assert stats["cell_saturated_low"] == pytest.approx(1 / 6)
    assert stats["cell_saturated_high"] == pytest.approx(2 / 6)
    assert stats["input_mean"] == pytest.approx(0.5)
    assert stats["input_saturated_low"] == stats["input_saturated_high"] == 0.0


def test_reduce_gates_exact():
    payload = reduce_gates(tiny_lstm())
    forget = payload["gates"].index("forget")
    np.testing.assert_allclose(payload["mean"][0, forget], [(0.275 + 0.465) / 2, 0.95], rtol=1e-6)
    np.testing.assert_allclose(payload["low"][0, forget], [2 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(payload["high"][0, forget], [1 / 3, 2 / 3], rtol=1e-6)
    assert payload["bin"] == 1 and payload["nonfinite"] == ""


def test_vanilla_rnn_has_no_gates(rnn_record):
    record = rnn_record("RNN_TANH")
    assert reduce_gates(record) is None
    assert gate_stats(record) == {}


def test_gru_per_row_names(rnn_record):
    stats = gate_stats(rnn_record("GRU", layers=2))
    assert "update_saturated_high/layer1" in stats and "new_mean/layer0" in stats and len(stats) == 18


def test_draw_gates_every_row_and_legend(rnn_record, image_ok):
    record = rnn_record("LSTM", layers=2, directions=2, time=100, hidden=128)
    fig = draw_gates(reduce_gates(record), step=5)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    for label in ("layer 0 forward", "layer 0 reverse", "layer 1 forward", "layer 1 reverse"):
        assert label in titles
    # the names beside each row's bars, in the curves' colours, are the legend
    bars = fig.axes[1::2]
    assert len(bars) == 4 and not fig.legends
    for ax in bars:
        names = ax.get_yticklabels()
        assert [t.get_text() for t in names] == ["input", "forget", "cell (tanh)", "output"]
        curves = fig.axes[fig.axes.index(ax) - 1].get_lines()
        assert [t.get_color() for t in names] == [line.get_color() for line in curves]
    image_ok(figure_to_rgb(fig))
    assert len(figure_to_png(fig)) < 150_000


def test_units_subsampled_and_time_binned(rnn_record):
    record = rnn_record("GRU", batch=2, time=1500, hidden=300, grad=False)
    payload = reduce_gates(record, max_time=256, max_units=100)
    assert payload["mean"].shape == (1, 3, 250) and payload["bin"] == 6
    assert payload["low"].shape == (1, 3, 100) and payload["units_shown"] == 100
    fig = draw_gates(payload)
    all_text = [t.get_text() for t in fig.findobj(Text)]
    assert "% of 100 of 300 units" in all_text and "time (bins of 6 steps)" in all_text


def test_nan_gates_are_named(rnn_record, image_ok):
    record = rnn_record("LSTM")
    record.gates["forget"][0, 0, 3, 1] = float("nan")
    payload = reduce_gates(record)
    assert payload["nonfinite"] == "NaN"
    fig = draw_gates(payload)
    assert "contains NaN" in fig.get_suptitle()
    image_ok(figure_to_rgb(fig))
    assert np.isnan(gate_stats(record)["forget_mean"])


def test_nan_in_padding_is_ignored(rnn_record):
    record = rnn_record("LSTM", batch=2, lengths=[20, 10])
    record.gates["forget"][0, 1, 15] = float("nan")
    assert reduce_gates(record)["nonfinite"] == ""
    assert not np.isnan(gate_stats(record)["forget_mean"])
