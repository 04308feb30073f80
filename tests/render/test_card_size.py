"""The ``"fast"`` pictures read where they are seen: in TensorBoard's image cards, about 350 px wide.

Every picture kind is painted from realistic payloads (one- and two-layer bidirectional LSTM/GRU records
with gates and gradients over sequences of different lengths, token labels, an 8-head self-attention, a
cross-attention, validation titles, approximate records, NaN marks, a many-epoch ``grad_decay``) while
:func:`~lightning_rnnviz.render.canvas.recording_text` keeps where each line of text went; the PNG is then
scaled to the card's width and the ink of every line measured (``tests/helpers/glyphs.py``): no title,
tick label, axis title or legend may be under :data:`~tests.helpers.glyphs.READABLE_PX`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lightning_rnnviz import render
from lightning_rnnviz.probe.records import AttentionRecord
from lightning_rnnviz.render import canvas as cv
from lightning_rnnviz.render import paint
from tests.helpers.glyphs import CARD_WIDTH, READABLE_PX, ink_heights, too_small
from tests.render.conftest import make_attention, make_rnn

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "barked", "loudly", "at", "night", "again",
         "and", "again", "until", "dawn"]


def _rnn(kind: str, layers: int = 1, directions: int = 1, **kwargs):
    record = make_rnn(kind, layers=layers, directions=directions, **kwargs)
    return record


def _many_to_one(kind: str, layers: int = 1, directions: int = 1, lengths=(25, 20, 10)):
    """A record whose gradient enters at each sequence's last step: ``grad_norm`` lines them up at the end
    and says so in a line under the title."""
    record = make_rnn(kind, layers=layers, directions=directions, batch=len(lengths), time=max(lengths),
                      lengths=list(lengths))
    record.direct_from = torch.tensor(lengths) - 1
    return record


def _approximate(record):
    record.exact = False
    record.notes = ("inter-layer dropout masks were not replayed bit for bit",)
    return record


def _history(record, epochs: int) -> dict[int, np.ndarray]:
    base = record.grad_norm.numpy()
    steps = np.arange(base.shape[1])
    return {e: base * 10.0 ** (-(base.shape[1] - 1 - steps) * (0.25 - 0.03 * e)) for e in range(epochs)}


def _attention_self(heads: int = 8, length: int = 12, labels: bool = True):
    record = make_attention(batch=2, heads=heads, queries=length, keys=length, key_lengths=[length, length - 3])
    record = AttentionRecord("encoder.self_attn", "MultiheadAttention", record.attention, record.key_lengths,
                             query_is_key=True)
    tokens = WORDS[:length] if labels else None
    return render.reduce_attention(record, 0, max_heads=8, query_labels=tokens, key_labels=tokens)


def _attention_cross():
    record = make_attention(batch=2, heads=1, queries=7, keys=11, key_lengths=[11, 9])
    record = AttentionRecord("decoder.attn", "MultiheadAttention", record.attention, record.key_lengths,
                             query_is_key=False)
    return render.reduce_attention(record, 1, query_labels=WORDS[:7], key_labels=WORDS[2:11],
                                   self_attention=False)


def _hidden_nan():
    record = make_rnn("LSTM", time=30)
    record.hidden[0, 0, 4, 2] = float("nan")
    return render.reduce_hidden(record)


def _grad_nan():
    record = make_rnn("GRU", layers=2, directions=2, time=30)
    record.hidden_grad[:, :, 5] = 0.0
    record.hidden_grad[0, 0, 9, 0] = float("inf")
    return render.reduce_grad_norm(record)


def _decay(rows: str, epochs: int, alignment: str = "start", approximate: bool = False):
    if rows == "one":
        record = make_rnn("LSTM", time=30, lengths=[30, 30, 30])
    else:
        record = make_rnn("GRU", layers=2, directions=2, time=30, lengths=[30, 30, 30])
    labels = [record.layer_label(i) for i in range(record.hidden.shape[0])]
    history = _history(record, epochs)
    horizons = {e: [float(10 + e + r) for r in range(len(labels))] for e in history}
    notes = ("inter-layer dropout masks were not replayed bit for bit",) if approximate else ()
    return functools.partial(paint.paint_grad_decay, history, "encoder.rnn", labels, step=1999, horizons=horizons,
                             notes=notes, alignment=alignment)


def _paint(painter, payload, **kwargs) -> Callable[[], np.ndarray]:
    return functools.partial(painter, payload, **kwargs)


# name -> a function that builds the payloads and returns the painting (timed apart from the building)
PICTURES: dict[str, Callable[[], Callable[[], np.ndarray]]] = {
    # hidden state
    "hidden GRU": lambda: _paint(paint.paint_hidden, render.reduce_hidden(_rnn("GRU", lengths=[20, 14, 9]), 1),
                                 step=120),
    "hidden LSTM 2x2 top-k": lambda: _paint(
        paint.paint_hidden, render.reduce_hidden(_rnn("LSTM", 2, 2, hidden=200, time=40), 0, top_k=64), step=1999),
    "hidden tokens val": lambda: _paint(
        paint.paint_hidden, render.reduce_hidden(_rnn("GRU", time=12, batch=1, lengths=[12]), labels=WORDS[:12]),
        step=7, validation=True),
    "hidden long binned": lambda: _paint(
        paint.paint_hidden, render.reduce_hidden(_rnn("GRU", time=1500, hidden=300, batch=1, lengths=[1500]),
                                                 top_k=64, max_time=256), step=3),
    "hidden NaN": lambda: _paint(paint.paint_hidden, _hidden_nan(), step=5),
    "hidden approximate": lambda: _paint(
        paint.paint_hidden, render.reduce_hidden(_approximate(_rnn("LSTM", 2, 1)), 0), step=11),
    # gates
    "gates GRU": lambda: _paint(paint.paint_gates, render.reduce_gates(_rnn("GRU", lengths=[20, 14, 9])),
                                step=1999),
    "gates LSTM 2x2": lambda: _paint(paint.paint_gates, render.reduce_gates(_rnn("LSTM", 2, 2, hidden=64, time=40)),
                                     step=1999),
    "gates LSTM val": lambda: _paint(paint.paint_gates, render.reduce_gates(_rnn("LSTM", hidden=600, time=300)),
                                     step=40, validation=True),
    # gradient norm
    "grad_norm LSTM end-aligned": lambda: _paint(
        paint.paint_grad_norm, render.reduce_grad_norm(_many_to_one("LSTM")), step=1999),
    "grad_norm GRU 2x2 end-aligned": lambda: _paint(
        paint.paint_grad_norm, render.reduce_grad_norm(_many_to_one("GRU", 2, 2)), step=1999, validation=True),
    "grad_norm zeros and Inf": lambda: _paint(paint.paint_grad_norm, _grad_nan(), step=2),
    "grad_norm approximate": lambda: _paint(
        paint.paint_grad_norm, render.reduce_grad_norm(_approximate(_rnn("LSTM", 2, 1, time=30))), step=12),
    # gradient decay over epochs
    "grad_decay 8 epochs": lambda: _decay("one", 8),
    "grad_decay 2x2 20 epochs": lambda: _decay("four", 20, approximate=True),
    "grad_decay end-aligned": lambda: _decay("one", 6, alignment="end"),
    # attention
    "attention 8 heads self": lambda: _paint(paint.paint_attention, _attention_self(), step=1999),
    "attention 8 heads no labels": lambda: _paint(paint.paint_attention, _attention_self(labels=False, length=40),
                                                  step=1999),
    "attention cross val": lambda: _paint(paint.paint_attention, _attention_cross(), step=300, validation=True),
    "attention binned": lambda: _paint(
        paint.paint_attention,
        render.reduce_attention(make_attention(heads=4, queries=9, keys=300, key_lengths=[300, 200]),
                                max_heads=8, max_steps=128), step=4),
    # nothing to draw
    "message": lambda: functools.partial(paint.paint_message, "encoder.rnn: hidden state h_t, sequence 1  ·  "
                                         "train step 3", "sequence 1 has no valid steps"),
}


def painted(name: str) -> tuple[np.ndarray, list[cv.TextBox]]:
    """Picture ``name`` and every line of text written on it."""
    painter = PICTURES[name]()
    with cv.recording_text() as boxes:
        rgb = painter()
    return rgb, list(boxes)


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_every_line_of_text_reads_at_card_width(name):
    rgb, boxes = painted(name)
    assert boxes, "no text was recorded"
    assert too_small(rgb, boxes) == [], f"too small at {CARD_WIDTH} px wide (least {READABLE_PX} px)"


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_text_stays_inside_the_picture(name):
    rgb, boxes = painted(name)
    height, width = rgb.shape[:2]
    for entry in boxes:
        x0, y0, x1, y1 = entry.box
        assert -1 <= x0 and -1 <= y0 and x1 <= width + 1 and y1 <= height + 1, entry


def test_recording_text_costs_nothing_outside_and_keeps_final_pixels():
    canvas = cv.Canvas(200, 60)
    canvas.text((150, 5), "Ab 12", 16)  # not recorded: no recording is active
    with cv.recording_text() as boxes:
        canvas.text((50, 20), "Ab 12", 16, anchor="mm")
        with canvas.fine((0, 0, 200, 60)):  # painted at twice the size: the box is still in final pixels
            canvas.text((10, 30), "x", 16, anchor="ls")
        canvas.text((110, 30), "up", 16, anchor="mm", rotate=True)
    assert [b.text for b in boxes] == ["Ab 12", "x", "up"]
    (x0, y0, x1, y1), rotated = boxes[0].box, boxes[0].rotated
    assert not rotated and abs((x0 + x1) / 2 - 50) <= 1.5 and abs((y0 + y1) / 2 - 20) <= 1.5
    assert boxes[1].box[3] <= 31 and boxes[1].box[0] >= 9
    assert boxes[2].rotated and boxes[2].box[3] - boxes[2].box[1] > boxes[2].box[2] - boxes[2].box[0]
    ink = canvas.to_array()[..., 0] < 128
    for entry in boxes[::2]:  # the ink lies in the box
        x0, y0, x1, y1 = (round(v) for v in entry.box)
        assert ink[y0:y1, x0:x1].sum() == ink[:, max(0, x0 - 4):x1 + 4][max(0, y0 - 4):y1 + 4].sum()


def test_gate_saturation_reads_as_shares_of_units():
    """The gates picture's right side: per gate, the share of units closed (left-saturated on most valid
    steps) and open (right-saturated on most), written as percentages where they fit."""
    record = make_rnn("LSTM", hidden=10, time=20, lengths=[20, 20, 20])
    gates = record.gates
    gates["forget"][..., :7] = 0.99  # 70 % of the units open on every step
    gates["input"][..., :2] = 0.01  # 20 % closed
    gates["input"][..., 2:] = 0.5
    with cv.recording_text() as boxes:
        paint.paint_gates(render.reduce_gates(record), step=1)
    texts = [b.text for b in boxes]
    assert "70%" in texts and "20%" in texts, texts
    assert "closed" in texts and "open" in texts


def test_grad_norm_marks_one_percent_of_the_peak():
    record = _many_to_one("LSTM", lengths=(30, 30, 30))
    with cv.recording_text() as boxes:
        rgb = paint.paint_grad_norm(render.reduce_grad_norm(record), step=1)
    assert any(b.text == "1% of peak" for b in boxes)
    assert too_small(rgb, boxes) == []


def test_grad_decay_lines_are_two_card_pixels_wide_and_late_epochs_dark():
    table = cv.colour_table("epochs")
    lightness = table.astype(float) @ (0.299, 0.587, 0.114)
    assert lightness[-1] < 80 < 150 < lightness[0] < 235  # the latest epoch darkest; the first light, not white
    assert (np.diff(lightness) < 0.5).all()  # darker and darker
    scale = CARD_WIDTH / paint.WIDTH
    assert paint.DECAY_LINE_PX * scale >= 2.0


def smallest_heights() -> dict[str, float]:
    """The least ink height (px, at card width) of each picture: the figures the report quotes."""
    out = {}
    for name in PICTURES:
        rgb, boxes = painted(name)
        heights = [h for _, h in ink_heights(rgb, boxes)]
        out[name] = min(heights) if heights else float("nan")
    return out
