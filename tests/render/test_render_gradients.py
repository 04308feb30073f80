import math

import numpy as np
import pytest
import torch
from matplotlib.text import Text

from lightning_rnnviz.probe.records import RNNRecord
from lightning_rnnviz.render import (
    draw_grad_decay,
    draw_grad_norm,
    figure_to_png,
    figure_to_rgb,
    grad_stats,
    reduce_grad_norm,
)
from lightning_rnnviz.render.gradients import NEAR_ZERO_LABEL, PEAK_LABEL, _log_limits, grad_horizon


def record_with_norms(
    norms: list[list[float]], lengths: list[int] | None = None, directions: int = 1
) -> RNNRecord:
    """A record whose ``grad_norm`` row ``r`` equals ``norms[r]`` for every sequence (one non-zero unit)."""
    table = torch.tensor(norms, dtype=torch.float32)  # (LD, T)
    rows, time = table.shape
    lengths_t = torch.tensor(lengths if lengths is not None else [time])
    batch = lengths_t.numel()
    grad = torch.zeros(rows, batch, time, 3)
    grad[..., 0] = table.unsqueeze(1)
    grad = grad * (torch.arange(time) < lengths_t.unsqueeze(1)).to(grad.dtype)[None, :, :, None]
    return RNNRecord(
        "rnn",
        "GRU",
        torch.zeros(rows, batch, time, 3),
        {},
        grad,
        None,
        None,
        lengths_t,
        num_layers=rows // directions,
        num_directions=directions,
    )


def test_vanishing_forward_gradient():
    stats = grad_stats(record_with_norms([[1e-4, 1e-3, 1e-2, 1e-1, 1.0]]))
    assert stats["first_norm"] == pytest.approx(1e-4)
    assert stats["last_norm"] == pytest.approx(1.0)
    assert stats["log10_ratio"] == pytest.approx(-4.0)
    assert stats["decay_per_step"] == pytest.approx(-1.0)


def test_reverse_direction_processes_backwards():
    forward = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    stats = grad_stats(record_with_norms([forward, forward[::-1]], directions=2))
    assert set(stats) == {
        f"{name}/layer0{suffix}"
        for name in ("first_norm", "last_norm", "log10_ratio", "decay_per_step", "horizon")
        for suffix in ("", "_reverse")
    }
    for suffix in ("", "_reverse"):
        assert stats[f"first_norm/layer0{suffix}"] == pytest.approx(1e-4)
        assert stats[f"last_norm/layer0{suffix}"] == pytest.approx(1.0)
        assert stats[f"log10_ratio/layer0{suffix}"] == pytest.approx(-4.0)
        assert stats[f"decay_per_step/layer0{suffix}"] == pytest.approx(-1.0)


def test_exploding_gradient_is_positive():
    stats = grad_stats(record_with_norms([[1e4, 1e3, 1e2, 1e1, 1.0]]))
    assert stats["log10_ratio"] == pytest.approx(4.0)
    assert stats["decay_per_step"] == pytest.approx(1.0)


def test_padded_steps_and_ragged_lengths():
    # steps 5 and 6 exist in no sequence (grad_norm is NaN there); the second sequence stops at 3
    norms = [[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 0.0, 0.0]]
    record = record_with_norms(norms, lengths=[5, 3])
    assert math.isnan(float(record.grad_norm[0, 6]))
    stats = grad_stats(record)
    assert stats["last_norm"] == pytest.approx(1.0)
    assert stats["decay_per_step"] == pytest.approx(-1.0)
    payload = reduce_grad_norm(record)
    assert payload["norm"].shape == (1, 5) and payload["nonfinite"] == ""


def test_fit_ignores_zero_and_nonfinite_points():
    norms = [[1e-5, 1e-4, 0.0, 1e-2, float("nan"), 1.0]]
    stats = grad_stats(record_with_norms(norms))
    assert stats["decay_per_step"] == pytest.approx(-1.0)
    assert stats["log10_ratio"] == pytest.approx(-5.0)
    zero_first = grad_stats(record_with_norms([[0.0, 1e-1, 1.0]]))
    assert zero_first["log10_ratio"] == -math.inf and zero_first["decay_per_step"] == pytest.approx(-1.0)
    assert math.isnan(grad_stats(record_with_norms([[0.0, 0.0, 1.0]]))["decay_per_step"])


def test_no_gradient(rnn_record):
    record = rnn_record(grad=False)
    assert reduce_grad_norm(record) is None
    assert grad_stats(record) == {}


def test_draw_grad_norm(rnn_record, image_ok):
    record = rnn_record("LSTM", layers=2, directions=2, time=100, hidden=128)
    fig = draw_grad_norm(reduce_grad_norm(record), step=9)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # the fixture decays ten decades: its first steps are below 1e-7 of the peak
    assert labels == ["layer 0 forward", "layer 0 reverse", "layer 1 forward", "layer 1 reverse", NEAR_ZERO_LABEL,
                      PEAK_LABEL]
    assert "step 9" in fig.get_suptitle()
    image_ok(figure_to_rgb(fig))
    assert len(figure_to_png(fig)) < 150_000


def test_draw_grad_norm_zeros_and_nan():
    record = record_with_norms([[1e-3, 0.0, 1e-1, float("nan"), 1.0]])
    payload = reduce_grad_norm(record)
    assert payload["nonfinite"] == "NaN"
    fig = draw_grad_norm(payload)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "layer 0"
    assert labels[1] == NEAR_ZERO_LABEL and labels[2] == "NaN"
    assert "contains NaN" in fig.get_suptitle()
    low, _ = fig.axes[0].get_ylim()
    assert 0 < low < 1e-4
    figure_to_rgb(fig)


def _many_to_one_bidirectional(layers: int = 1, steps: int = 60) -> RNNRecord:
    """A bidirectional many-to-one record: each forward row vanishes from the last step back, 10x a step
    below the first layer's, down to 1e-19 of its peak; each reverse row's gradient enters at the last step
    only (zero elsewhere) but the first layer's, which the second layer feeds at every step."""
    t = np.arange(steps, dtype=np.float64)
    rows = []
    for layer in range(layers):
        forward = 10.0 ** ((t - steps + 1) / (steps / 19))
        reverse = np.where(t == steps - 1, 2.0, 0.0) if layer == layers - 1 else forward[::-1] * 0.5
        rows += [forward.tolist(), reverse.tolist()]
    return record_with_norms(rows, directions=2)


def test_bidirectional_many_to_one_axis_spans_the_data_not_the_vanished_steps():
    """The reverse row's zeros and the forward row's steps below 1e-7 of its peak (float32 rounding, nothing
    an update can feel) are triangles on a floor a decade below the rest, not 20 decades down."""
    payload = reduce_grad_norm(_many_to_one_bidirectional())
    assert payload["norm"][0].min() < 1e-18  # the vanished steps are in the payload, unchanged
    floor, ceiling = _log_limits(payload["norm"])
    assert ceiling == pytest.approx(2.0)
    assert 1e-8 <= floor < 1e-7  # a decade below the forward row's smallest value above 1e-7 of its peak, 1
    ax = draw_grad_norm(payload).axes[0]
    low, high = ax.get_ylim()
    assert low == pytest.approx(floor / 2) and high == pytest.approx(ceiling * 2)
    assert math.log10(high / low) < 10  # was 21 decades
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["layer 0 forward", "layer 0 reverse", NEAR_ZERO_LABEL, PEAK_LABEL]


def test_bidirectional_colour_tells_the_direction_and_style_the_layer():
    fig = draw_grad_norm(reduce_grad_norm(_many_to_one_bidirectional(layers=2)))
    lines = {t.get_text(): h for t, h in zip(fig.axes[0].get_legend().get_texts(),
                                               fig.axes[0].get_legend().legend_handles)}
    colour = {name: lines[name].get_color() for name in lines if name.startswith("layer")}
    style = {name: lines[name].get_linestyle() for name in colour}
    assert colour["layer 0 forward"] == colour["layer 1 forward"] != colour["layer 0 reverse"]
    assert colour["layer 0 reverse"] == colour["layer 1 reverse"]
    assert style["layer 0 forward"] == style["layer 0 reverse"] != style["layer 1 forward"]
    assert style["layer 1 forward"] == style["layer 1 reverse"]
    # one-directional: colour still tells the layer
    fig = draw_grad_norm(reduce_grad_norm(record_with_norms([[1.0, 2.0], [3.0, 4.0]])))
    handles = fig.axes[0].get_legend().legend_handles
    assert handles[0].get_color() != handles[1].get_color()
    assert handles[0].get_linestyle() == handles[1].get_linestyle() == "-"


def test_near_zero_marks_of_two_curves_do_not_hide_each_other():
    fig = draw_grad_norm(reduce_grad_norm(_many_to_one_bidirectional()))
    ax = fig.axes[0]
    marks = [line for line in ax.lines if line.get_marker() == "v"]
    assert len(marks) == 2  # the forward row's vanished steps, the reverse row's zeros
    heights = [line.get_transform().transform(line.get_xydata()[:1])[0, 1] for line in marks]
    assert abs(heights[0] - heights[1]) >= 7  # pixels: one row of triangles above the other
    # the reverse row's one gradient, a lone point between zeros, is drawn as a dot
    assert any(line.get_marker() == "o" and line.get_xydata()[0, 0] == 59 for line in ax.lines)


def test_grad_decay_axis_spans_the_data_too():
    curve = _many_to_one_bidirectional().grad_norm.double().numpy()
    fig = draw_grad_decay({0: curve, 1: curve * 0.5}, "rnn", ["layer 0 forward", "layer 0 reverse"])
    low, _ = fig.axes[0].get_ylim()
    assert low > 1e-9
    assert any(t.get_text().startswith(f"{NEAR_ZERO_LABEL} drawn at") for t in fig.findobj(Text))


def test_draw_grad_norm_all_zero():
    fig = draw_grad_norm(reduce_grad_norm(record_with_norms([[0.0, 0.0, 0.0]])))
    figure_to_rgb(fig)


def test_grad_decay(image_ok):
    labels = ["layer 0", "layer 1"]
    t = np.arange(50, dtype=np.float64)
    history = {
        epoch: np.stack([10 ** ((t - 50) / (10 + epoch)), 10 ** ((t - 50) / (5 + epoch))])
        for epoch in range(8)
    }
    history[3] = history[3][:, :30]  # a shorter curve
    history[5] = torch.from_numpy(history[5]).float()  # tensors work too
    history[6][:, 40:] = np.nan  # NaN padding at the end
    fig = draw_grad_decay(history, "encoder.rnn", labels, step=100)
    assert [ax.get_title(loc="left") for ax in fig.axes[:2]] == labels
    assert all(ax.get_yscale() == "log" for ax in fig.axes[:2])
    assert fig.axes[-1].get_ylabel() == "epoch"
    assert "NaN" not in fig.get_suptitle()  # trailing padding is not a warning
    image_ok(figure_to_rgb(fig))
    assert len(figure_to_png(fig)) < 150_000


def test_grad_decay_single_epoch_zeros_and_nan():
    curve = np.array([[1e-3, 0.0, 1e-2, np.nan, 1.0, np.nan]])
    fig = draw_grad_decay({4: curve}, "rnn", ["layer 0"])
    assert "contains NaN" in fig.get_suptitle()
    assert any(t.get_text().startswith(f"{NEAR_ZERO_LABEL} drawn at") for t in fig.findobj(Text))
    figure_to_rgb(fig)


def test_grad_decay_caps_the_number_of_curves():
    history = {epoch: np.full((1, 5), 10.0**-epoch) for epoch in range(40)}
    fig = draw_grad_decay(history, "rnn", ["layer 0"], max_curves=8)
    assert "(8 of 40 epochs)" in fig.get_suptitle()
    assert len(fig.axes[0].collections[0].get_segments()) == 8
    low, high = fig.axes[-1].get_ylim()  # the colour bar still spans every epoch
    assert (low, high) == (0, 39)


def test_grad_decay_errors():
    with pytest.raises(ValueError, match="`history` is empty"):
        draw_grad_decay({}, "rnn", ["layer 0"])
    with pytest.raises(ValueError, match=r"`history\[2\]` has shape \(3, 4\); expected \(2, time\)"):
        draw_grad_decay({2: np.ones((3, 4))}, "rnn", ["layer 0", "layer 1"])


# --- the gradient horizon ------------------------------------------------------------------------------
def _record(per_sequence: list[list[float]], lengths: list[int], directions: int = 1) -> RNNRecord:
    """Rows x sequences of norms: ``per_sequence[r * batch + b]`` is row r, sequence b (zero past its length)."""
    batch, time = len(lengths), max(lengths)
    rows = len(per_sequence) // batch
    grad = torch.zeros(rows, batch, time, 2)
    for index, values in enumerate(per_sequence):
        r, b = divmod(index, batch)
        grad[r, b, : len(values), 1] = torch.tensor(values)
    return RNNRecord("rnn", "GRU", torch.zeros(rows, batch, time, 2), {}, grad, None, None, torch.tensor(lengths),
                     num_layers=rows // directions, num_directions=directions)


def test_horizon_counts_steps_back_until_the_norm_falls_below_one_percent_of_its_peak():
    # peak 1.0 at the last step; 1 % is 0.01: steps 0 (1.0), 1 (0.2), 2 (0.01, exactly 1 %) count; 3 does not
    record = _record([[1e-4, 5e-3, 0.01, 0.2, 1.0]], [5])
    assert grad_horizon(record).tolist() == [3.0]
    assert grad_stats(record)["horizon"] == 3.0


def test_horizon_of_a_loss_on_every_step_is_the_sequence_length():
    assert grad_horizon(_record([[0.8, 1.0, 0.9, 0.7, 1.1, 0.9]], [6])).tolist() == [6.0]


def test_horizon_is_counted_from_each_padded_sequence_own_end():
    # lengths 5 and 3: sequence 0 decays tenfold per step back (1.0, 0.1, 0.01 | 1e-3) -> 3;
    # sequence 1 is flat over its 3 steps -> 3; their mean 3. Aligned on the time axis instead, the
    # padded zeros of sequence 1 would look like a vanished gradient.
    record = _record([[1e-4, 1e-3, 0.01, 0.1, 1.0], [0.5, 0.5, 0.5]], [5, 3])
    assert grad_horizon(record).tolist() == [3.0]
    record = _record([[1e-4, 1e-3, 0.01, 0.1, 1.0], [1e-3, 1.0, 1.0]], [5, 3])  # 1e-3 is below 1 %: 2 steps
    assert grad_horizon(record).tolist() == [2.5]


def test_horizon_of_the_reverse_direction_counts_from_t0():
    forward = [1e-4, 1e-3, 0.01, 0.1, 1.0]
    record = _record([forward, forward[::-1]], [5], directions=2)  # reverse: processed from t=4 to t=0
    assert grad_horizon(record).tolist() == [3.0, 3.0]
    # a peak in the middle: the count stops at the first step below 1 % of it
    record = _record([[2.0, 1.0, 100.0, 0.5, 0.009]], [5], directions=1)
    assert grad_horizon(record).tolist() == [0.0]  # the last step already holds less than 1 % of 100


def test_horizon_leaves_out_sequences_without_a_usable_peak():
    record = _record([[0.0, 0.0, 0.0], [0.1, 1.0, 1.0], [float("nan"), 1.0, 1.0]], [3, 3, 3])
    assert grad_horizon(record).tolist() == [3.0]  # only the middle sequence counts
    assert math.isnan(grad_horizon(_record([[0.0, 0.0]], [2])).item())


def test_grad_decay_headings_carry_each_epochs_horizon_and_the_approximation_note():
    from lightning_rnnviz.render.gradients import horizon_entries, horizon_text

    history = {e: np.logspace(-4 + e, -1, 12)[None] for e in range(6)}
    horizons = {0: [3.0], 1: [5.0], 2: [None], 3: [8.0], 4: [float("nan")], 5: [12.0]}
    entries = horizon_entries(horizons, sorted(history), 0)
    assert entries == [(0, 3.0), (1, 5.0), (3, 8.0), (5, 12.0)]  # epochs without a horizon are left out
    assert horizon_text(entries[:2]) == "horizon: e0 3, e1 5"
    assert len(horizon_entries({e: [float(e)] for e in range(10)}, list(range(10)), 0, most=3)) == 3
    note = "On CUDA, cuDNN draws the inter-layer dropout masks (p=0.2) inside the library."
    fig = draw_grad_decay(history, "rnn", ["layer 0"], step=8, horizons=horizons, notes=(note,))
    right = [ax.get_title(loc="right") for ax in fig.axes if ax.get_title(loc="right")]
    assert right == ["horizon: e0 3, e3 8, e5 12"]  # as many as fit beside the panel's own title
    assert "approximate" in fig._suptitle.get_text() and "cuDNN" in fig._suptitle.get_text()
    from lightning_rnnviz.render import paint_grad_decay

    plain = paint_grad_decay(history, "rnn", ["layer 0"], step=8)
    marked = paint_grad_decay(history, "rnn", ["layer 0"], step=8, horizons=horizons, notes=(note,))
    assert marked.shape[0] > plain.shape[0]  # the note takes more lines under the title
