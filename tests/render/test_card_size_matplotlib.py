"""The matplotlib renderer's pictures read where they are seen: at TensorBoard's card width (350 px), every
title, tick label, axis label, colour-bar label and legend line has capitals and digits at least 7 px tall,
measured on the rendered picture scaled to that width (:mod:`tests.helpers.glyphs`), not from a font size.

The boxes are those of the lines of text Agg really drew: each call of the renderer's ``draw_text`` gives
one line, its position and its font, so a multi-line title is measured line by line and a text that falls
outside the picture is measured as missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure

from lightning_rnnviz.probe.records import AttentionRecord, RNNRecord
from lightning_rnnviz.render import (
    draw_attention,
    draw_gates,
    draw_grad_decay,
    draw_grad_norm,
    draw_hidden,
    figure_to_rgb,
    reduce_attention,
    reduce_gates,
    reduce_grad_norm,
    reduce_hidden,
)
from lightning_rnnviz.render.gradients import grad_horizon
from tests.helpers.glyphs import CARD_WIDTH, TextBox, ink_heights, too_small
from tests.render.conftest import make_attention, make_rnn

WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "Bob", "who", "was", "not", "amused", "by",
         "it", "at", "all", "today", "42", "times", "over", "again", "then", "left", "quietly")


def _tokens(count: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(count)]


def _rnn(kind: str, layers: int, directions: int, lengths: list[int], *, seed: int = 0, hidden: int = 32,
         many_to_one: bool = False, name: str = "encoder.rnn", exact: bool = True) -> RNNRecord:
    record = make_rnn(kind, layers=layers, directions=directions, batch=len(lengths), time=max(lengths),
                      hidden=hidden, lengths=lengths, seed=seed)
    record.name = name
    if many_to_one:  # the loss reads each sequence's last step: gradients line up at the ends
        record.direct_from = record.lengths - 1
    if not exact:
        record.exact = False
        record.notes = ("cuDNN's dropout between layers could not be replayed; the states are close, not equal",)
    return record


def _attention(heads: int, queries: int, keys: int, key_lengths: list[int] | None, *, self_attention: bool,
               name: str) -> AttentionRecord:
    base = make_attention(batch=len(key_lengths or [0, 0]), heads=heads, queries=queries, keys=keys,
                          key_lengths=key_lengths, seed=3)
    return AttentionRecord(name, "MultiheadAttention", base.attention, base.key_lengths,
                           query_is_key=self_attention)


def _history(record: RNNRecord, epochs: int) -> tuple[dict[int, np.ndarray], dict[int, list[float]]]:
    """Gradient norms of a fixed batch over ``epochs`` epochs, the horizon growing as training goes on."""
    base = record.grad_norm.numpy()
    columns = np.arange(base.shape[1])
    history, horizons = {}, {}
    for epoch in range(epochs):
        slope = 10.0 ** (-(columns[::-1]) * (0.12 - 0.015 * epoch))
        history[epoch] = base * slope[None, :] * (1.0 + 0.1 * epoch)
        horizons[epoch] = [float(h) for h in grad_horizon(record)] if epoch % 2 else [5.0 + epoch] * base.shape[0]
    return history, horizons


def _nan_record() -> RNNRecord:
    record = _rnn("LSTM", 1, 1, [30, 24, 17], seed=4)
    record.hidden[0, 0, 5, 3] = float("nan")
    record.gates["forget"][0, 0, 6, 2] = float("nan")
    record.hidden_grad[0, 0, 7, 1] = float("nan")
    return record


def _cases() -> dict[str, Callable[[], Figure]]:
    """Every kind of picture with payloads as a training run makes them."""
    lstm1 = _rnn("LSTM", 1, 1, [40, 33, 21, 12])
    lstm2 = _rnn("LSTM", 2, 2, [40, 33, 21, 12], seed=1, hidden=128)
    gru2 = _rnn("GRU", 2, 2, [25, 25, 18], seed=2, hidden=64)
    ends = _rnn("LSTM", 2, 2, [60, 45, 30], seed=5, many_to_one=True, hidden=64)
    long_gru = _rnn("GRU", 1, 1, [1500, 1200], seed=6, hidden=300)
    approx = _rnn("LSTM", 2, 1, [30, 30], seed=7, exact=False)
    nan = _nan_record()
    self_attn = _attention(8, 12, 12, [12, 9], self_attention=True, name="encoder.layers.0.self_attn")
    cross = _attention(8, 7, 11, [11, 8], self_attention=False, name="decoder.cross_attn")
    small = _attention(2, 5, 6, None, self_attention=None, name="attn")
    long_attn = _attention(4, 300, 300, None, self_attention=True, name="attn")
    history, horizons = _history(lstm2, 8)
    many, _ = _history(lstm1, 40)
    end_history, _ = _history(ends, 6)
    return {
        "hidden_lstm1_tokens": lambda: draw_hidden(reduce_hidden(lstm1, 0, labels=_tokens(40)), step=120),
        "hidden_lstm2_bidir": lambda: draw_hidden(reduce_hidden(lstm2, 2, labels=_tokens(21)), step=120),
        "hidden_gru2_bidir_validation": lambda: draw_hidden(reduce_hidden(gru2, 1), step=3000, validation=True),
        "hidden_long_binned": lambda: draw_hidden(reduce_hidden(long_gru, 0), step=7),
        "hidden_approximate": lambda: draw_hidden(reduce_hidden(approx, 1, labels=_tokens(30)), step=55),
        "hidden_nan": lambda: draw_hidden(reduce_hidden(nan, 0), step=8),
        "gates_lstm1": lambda: draw_gates(reduce_gates(lstm1), step=120),
        "gates_lstm2_bidir": lambda: draw_gates(reduce_gates(lstm2), step=120),
        "gates_gru2_bidir_validation": lambda: draw_gates(reduce_gates(gru2), step=3000, validation=True),
        "gates_long_binned": lambda: draw_gates(reduce_gates(long_gru, max_units=100), step=7),
        "gates_nan": lambda: draw_gates(reduce_gates(nan), step=8),
        "grad_norm_lstm1": lambda: draw_grad_norm(reduce_grad_norm(lstm1), step=120),
        "grad_norm_lstm2_bidir": lambda: draw_grad_norm(reduce_grad_norm(lstm2), step=120),
        "grad_norm_ends_validation": lambda: draw_grad_norm(reduce_grad_norm(ends), step=40, validation=True),
        "grad_norm_approximate": lambda: draw_grad_norm(reduce_grad_norm(approx), step=55),
        "grad_norm_nan": lambda: draw_grad_norm(reduce_grad_norm(nan), step=8),
        "grad_decay_bidir_8_epochs": lambda: draw_grad_decay(
            history, "encoder.rnn", [lstm2.layer_label(i) for i in range(4)], step=800, horizons=horizons),
        "grad_decay_40_epochs": lambda: draw_grad_decay(many, "encoder.rnn", ["layer 0"], step=4000,
                                                        notes=approx.notes),
        "grad_decay_ends_6_epochs": lambda: draw_grad_decay(
            end_history, "encoder.rnn", [ends.layer_label(i) for i in range(4)], step=600, alignment="end"),
        "attention_self_8_heads_tokens": lambda: draw_attention(
            reduce_attention(self_attn, 0, query_labels=_tokens(12), key_labels=_tokens(12)), step=120),
        "attention_cross_8_heads_tokens": lambda: draw_attention(
            reduce_attention(cross, 1, query_labels=_tokens(7), key_labels=_tokens(11), self_attention=False),
            step=120, validation=True),
        "attention_2_heads": lambda: draw_attention(reduce_attention(small, 1), step=5),
        "attention_long_binned": lambda: draw_attention(reduce_attention(long_attn, 0), step=5),
    }


CASES = _cases()


@contextmanager
def drawn_lines() -> Iterator[list[tuple]]:
    """The lines of text Agg draws meanwhile: ``(text, x, baseline y from the top, width, ascent, descent,
    angle)`` in the picture's pixels."""
    lines: list[tuple] = []
    real = RendererAgg.draw_text

    def record(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if s.strip():
            width, tall, descent = self.get_text_width_height_descent(s, prop, ismath)
            top = y if self.flipy() else self.height - y
            lines.append((s, x, top, width, tall - descent, descent, angle))
        return real(self, gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    RendererAgg.draw_text = record
    try:
        yield lines
    finally:
        RendererAgg.draw_text = real


def _box(text: str, x: float, base: float, width: float, ascent: float, descent: float, angle: float) -> TextBox:
    """One drawn line's box, a pixel added on each side for the antialiased edges."""
    if abs(angle % 180 - 90) < 1:  # reads upwards: the glyphs stand left of x, from the baseline up
        return TextBox(text, (x - ascent - 1, base - width - 1, x + descent + 1, base + 1), True)
    assert abs(angle % 180) < 1, f"{text!r} drawn at {angle} degrees"
    return TextBox(text, (x - 1, base - ascent - 1, x + width + 1, base + descent + 1))


def render(fig: Figure) -> tuple[np.ndarray, list[TextBox]]:
    """The picture as the callback logs it, and the boxes of the lines of text on it."""
    with drawn_lines() as lines:
        rgb = figure_to_rgb(fig)
    return rgb, [_box(*line) for line in lines]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_text_is_readable_at_card_width(case):
    rgb, lines = render(CASES[case]())
    assert lines, "no text was drawn"
    assert rgb.shape[1] >= CARD_WIDTH and max(rgb.shape[:2]) <= 800
    small = too_small(rgb, lines)
    assert not small, f"{case}: text under 7 px at {CARD_WIDTH} px wide: {small}"


def test_the_measure_sees_small_type():
    """The same picture with its type halved fails: the measure is of the glyphs, not of the boxes."""
    fig = CASES["grad_norm_lstm1"]()
    for text in fig.findobj(lambda artist: hasattr(artist, "get_fontsize") and hasattr(artist, "set_fontsize")):
        text.set_fontsize(text.get_fontsize() / 2)
    rgb, lines = render(fig)
    heights = [h for _, h in ink_heights(rgb, lines)]
    assert len(too_small(rgb, lines)) > 0.7 * len(heights)


def test_text_stays_inside_the_picture():
    for case, make in CASES.items():
        rgb, lines = render(make())
        h, w = rgb.shape[:2]
        outside = [line.text for line in lines
                   if line.box[0] < -1 or line.box[1] < -1 or line.box[2] > w + 1 or line.box[3] > h + 1]
        assert not outside, f"{case}: {outside}"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _luminance(rgba) -> float:
    red, green, blue = rgba[:3]
    return 0.299 * red + 0.587 * green + 0.114 * blue


def test_grad_decay_lines_are_two_pixels_on_a_card_and_the_latest_epoch_darkest():
    fig = CASES["grad_decay_bidir_8_epochs"]()
    rgb, _ = render(fig)
    lines = fig.axes[0].collections[0]
    card_px = lines.get_linewidths()[0] * fig.dpi / 72 * CARD_WIDTH / rgb.shape[1]
    assert card_px >= 2.0
    colours = [tuple(c) for c in lines.get_colors()]
    by_epoch = list(dict.fromkeys(colours))  # in the order drawn: epoch 0 first, the latest last (on top)
    assert len(by_epoch) == 8
    light = [_luminance(c) for c in by_epoch]
    assert light == sorted(light, reverse=True) and light[0] - light[-1] > 0.5
    assert light[0] < 0.85  # the first epoch still shows on white
    assert fig.axes[-1].get_ylabel() == "epoch"


def test_grad_norm_marks_one_percent_of_the_peak_and_the_horizon():
    # one sequence of 5 steps, ten times smaller each step back: steps 4 and 3 hold 1 % of the peak, 2 not
    grad = torch.zeros(1, 1, 5, 1)
    grad[0, 0, :, 0] = torch.tensor([1e-4, 1e-3, 1e-2 * 0.999, 1e-1, 1.0])
    record = RNNRecord("rnn", "RNN_TANH", torch.zeros(1, 1, 5, 1), {}, grad, None, None, torch.tensor([5]))
    assert grad_horizon(record).tolist() == [2.0]
    ax = draw_grad_norm(reduce_grad_norm(record)).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["layer 0", "1% of peak"]
    level = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(level) == 1 and level[0].get_ydata()[0] == pytest.approx(0.01)
    assert level[0].get_color() == ax.get_lines()[0].get_color()
    dots = [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_linestyle() == "None"]
    assert len(dots) == 1
    x, y = dots[0].get_xydata()[0]
    assert 2 < x < 3 and y == pytest.approx(0.01)  # the horizon: two steps back from the end
    rgb, lines = render(ax.figure)
    assert not too_small(rgb, lines)


def test_gates_show_the_share_of_units_closed_and_open():
    record = make_rnn("LSTM", hidden=10, time=20, lengths=[20, 20, 20])
    record.gates["forget"][..., :7] = 0.99  # 70 % of the units open on every step
    record.gates["input"][..., :2] = 0.01  # 20 % closed
    record.gates["input"][..., 2:] = 0.5
    fig = draw_gates(reduce_gates(record), step=1)
    bars = fig.axes[1]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["input", "forget", "cell (tanh)", "output"]
    assert (bars.get_title(loc="left"), bars.get_title(loc="right")) == ("closed", "open")
    parts = {(round(p.get_y() + p.get_height() / 2), round(p.get_x()), round(p.get_width())) for p in bars.patches}
    assert {(0, 0, 20), (0, 20, 80), (1, 30, 70)} <= parts  # input: 20 % closed, the rest; forget: 70 % open
    written = [t.get_text() for t in bars.texts]
    assert {"80%", "70%"} <= set(written) and ("20%" in written or "20" in written)  # "%" where it fits
    rgb, lines = render(fig)
    assert not too_small(rgb, lines)
