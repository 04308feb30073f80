import math
import pickle

import numpy as np
import pytest
import torch
from matplotlib.text import Text

from lightning_rnnviz.probe.records import RNNRecord
from lightning_rnnviz.render import draw_hidden, figure_to_png, figure_to_rgb, hidden_stats, reduce_hidden


def texts(fig):
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def tiny_gru() -> RNNRecord:
    """One row, sequences of lengths 3 and 2, two units; the padded step holds junk that must be ignored."""
    hidden = torch.tensor(
        [
            [[0.5, -0.5], [1.0, 0.0], [0.98, -0.96]],
            [[0.0, 0.2], [-0.6, 0.8], [9.0, 9.0]],
        ]
    ).unsqueeze(0)
    return RNNRecord("gru", "GRU", hidden, {}, None, None, None, torch.tensor([3, 2]))


def test_hidden_stats_exact():
    stats = hidden_stats(tiny_gru())
    assert set(stats) == {"mean_abs", "saturated", "step_change"}
    assert stats["mean_abs"] == pytest.approx((0.5 + 0.5 + 1.0 + 0.98 + 0.96 + 0.2 + 0.6 + 0.8) / 10)
    assert stats["saturated"] == pytest.approx(3 / 10)  # 1.0, 0.98, -0.96
    pairs = [math.hypot(0.5, 0.5), math.hypot(0.02, 0.96), math.hypot(0.6, 0.6)]
    assert stats["step_change"] == pytest.approx(sum(pairs) / 3)


def test_hidden_stats_saturated_only_for_tanh_kinds(rnn_record):
    assert "saturated" not in hidden_stats(rnn_record("RNN_RELU", grad=False))
    projected = rnn_record("LSTM")
    projected.hidden = projected.hidden[..., :3]
    assert "saturated" not in hidden_stats(projected)
    assert "saturated" in hidden_stats(rnn_record("LSTM"))


def test_hidden_stats_per_row_and_empty(rnn_record):
    stats = hidden_stats(rnn_record("GRU", layers=2, directions=2))
    assert len(stats) == 12 and "step_change/layer1_reverse" in stats
    single_step = RNNRecord("r", "GRU", torch.ones(1, 1, 1, 2) * 0.5, {}, None, None, None, torch.tensor([1]))
    stats = hidden_stats(single_step)
    assert stats["mean_abs"] == pytest.approx(0.5) and math.isnan(stats["step_change"])


def test_reduce_hidden_crops_padding(rnn_record):
    record = rnn_record("GRU", batch=2, time=20, lengths=[20, 5])
    record.hidden[:, 1, 5:] = 100.0  # junk past the length must not be shown nor set the colour range
    payload = reduce_hidden(record, sample=1)
    assert payload["values"].shape == (1, 8, 5) and payload["length"] == 5
    assert np.abs(payload["values"]).max() < 1.0
    np.testing.assert_array_equal(payload["values"][0], record.hidden[0, 1, :5].T.numpy())


def test_reduce_hidden_top_k_by_variance():
    steps = torch.linspace(0, 6.28, 30)
    amplitude = torch.full((10,), 0.01)
    amplitude[[2, 5, 7]] = torch.tensor([0.5, 0.9, 0.3])
    hidden = (torch.sin(steps)[:, None] * amplitude[None, :]).reshape(1, 1, 30, 10)
    record = RNNRecord("rnn", "RNN_TANH", hidden, {}, None, None, None, torch.tensor([30]))
    payload = reduce_hidden(record, top_k=3)
    assert payload["units"].tolist() == [[2, 5, 7]]
    np.testing.assert_allclose(payload["values"][0, 1], hidden[0, 0, :, 5].numpy())
    fig = draw_hidden(payload)
    assert "top 3 of 10 units by variance" in texts(fig)
    assert "top" not in " ".join(texts(draw_hidden(reduce_hidden(record, top_k=10))))


def test_reduce_hidden_keeps_nan_units_visible():
    hidden = torch.rand(1, 1, 10, 20) * 0.1
    hidden[0, 0, 4, 13] = float("nan")
    record = RNNRecord("rnn", "GRU", hidden, {}, None, None, None, torch.tensor([10]))
    payload = reduce_hidden(record, top_k=4)
    assert 13 in payload["units"][0] and payload["nonfinite"] == "NaN"


def test_colour_limits(rnn_record):
    assert reduce_hidden(rnn_record("GRU"))["limit"] == 1.0
    relu = rnn_record("RNN_RELU")
    relu.hidden = relu.hidden.abs() * 4
    payload = reduce_hidden(relu)
    assert payload["limit"] == pytest.approx(float(relu.hidden[:, 0].abs().max()))
    assert not payload["bounded"]


def test_long_sequence_is_binned_and_bounded(rnn_record, image_ok):
    record = rnn_record("LSTM", layers=2, batch=2, time=1500, hidden=300, grad=False)
    payload = reduce_hidden(record, labels=[f"w{i}" for i in range(1500)])
    assert payload["bin"] == 6 and payload["values"].shape == (2, 64, 250)
    assert payload["labels"] is None  # tokens make no sense for bins
    assert len(pickle.dumps(payload)) < 200_000
    fig = draw_hidden(payload, step=3)
    assert "time (bins of 6 steps)" in texts(fig)
    image_ok(figure_to_rgb(fig))
    assert len(figure_to_png(fig)) < 150_000


def test_token_labels(rnn_record):
    record = rnn_record("GRU", batch=1, time=12, lengths=[10])
    tokens = [f"tok{i}" for i in range(12)]
    payload = reduce_hidden(record, labels=tokens)
    assert payload["labels"] == tokens[:10]
    fig = draw_hidden(payload)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == tokens[:10]
    with pytest.raises(ValueError, match="`labels` has 4 entries but 10 steps"):
        reduce_hidden(record, labels=tokens[:4])


def test_many_tokens_are_thinned(rnn_record):
    record = rnn_record("GRU", batch=1, time=200)
    payload = reduce_hidden(record, labels=[str(i) for i in range(200)])
    ticks = draw_hidden(payload).axes[0].get_xticklabels()
    assert 10 <= len(ticks) <= 40


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_is_drawn_and_named(rnn_record, image_ok, shows_bad_color, bad):
    record = rnn_record("LSTM", layers=2, directions=2)
    record.hidden[1, 0, 5, 3] = bad
    payload = reduce_hidden(record)
    fig = draw_hidden(payload)
    word = "NaN" if math.isnan(bad) else "Inf"
    assert f"contains {word}" in fig.get_suptitle()
    rgb = figure_to_rgb(fig)
    image_ok(rgb)
    assert shows_bad_color(rgb)
    assert not shows_bad_color(figure_to_rgb(draw_hidden(reduce_hidden(rnn_record("LSTM")))))


def test_every_layer_and_direction_has_a_panel(rnn_record):
    fig = draw_hidden(reduce_hidden(rnn_record("GRU", layers=3, directions=2)))
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    for layer in range(3):
        assert f"layer {layer} forward" in titles and f"layer {layer} reverse" in titles


def test_title_step_and_approximation(rnn_record):
    record = rnn_record("LSTM", layers=2)
    record.exact = False
    record.notes = ("inter-layer dropout active: states above layer 0 are approximate",)
    title = draw_hidden(reduce_hidden(record), step=42).get_suptitle()
    assert "encoder.rnn" in title and "step 42" in title
    assert "(approximate: inter-layer dropout active" in title
    custom = draw_hidden(reduce_hidden(record), step=1, title="my heading").get_suptitle()
    assert custom.startswith("my heading") and "approximate" in custom


def test_empty_sequence_draws_a_message(rnn_record, image_ok):
    record = rnn_record("GRU", batch=2, lengths=[20, 0])
    payload = reduce_hidden(record, sample=1)
    fig = draw_hidden(payload)
    assert any("no valid steps" in t for t in texts(fig))
    image_ok(figure_to_rgb(fig))


def test_argument_errors(rnn_record):
    record = rnn_record(batch=2)
    with pytest.raises(ValueError, match=r"`sample`=2 is out of range for a batch of 2"):
        reduce_hidden(record, sample=2)
    with pytest.raises(ValueError, match="`top_k`=0 must be a positive int"):
        reduce_hidden(record, top_k=0)
    with pytest.raises(ValueError, match="`max_time`"):
        reduce_hidden(record, max_time=-1)
