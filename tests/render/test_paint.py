"""The fast renderer (numpy + Pillow): canvas pieces checked pixel by pixel, pictures checked for what
they must show (sizes, colours, NaN marks, the same inputs and errors as the matplotlib figures)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_rnnviz import render
from lightning_rnnviz.probe.records import RNNRecord
from lightning_rnnviz.render import canvas as cv
from lightning_rnnviz.render import paint
from lightning_rnnviz.sinks.png import encode_png
from tests.render.conftest import MAX_PNG_BYTES


def _luminance(rgb: np.ndarray) -> np.ndarray:
    linear = np.where(rgb / 255 <= 0.04045, rgb / 255 / 12.92, ((rgb / 255 + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def _count_colour(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int = 2) -> int:
    return int((np.abs(rgb.astype(int) - np.array(colour)).max(-1) <= tolerance).sum())


# --- colour maps --------------------------------------------------------------------------------------
def test_sequential_map_gets_lighter_all_along():
    lum = _luminance(cv.colour_table("sequential").astype(float))
    assert np.all(np.diff(lum) > -1e-3)  # 8-bit rounding may wiggle a neighbour pair
    assert np.all(np.diff(lum[::8]) > 0)
    assert lum[0] < 0.08 and lum[-1] > 0.7


def test_diverging_map_is_symmetric_in_lightness_and_white_in_the_middle():
    table = cv.colour_table("diverging").astype(float)
    lum = _luminance(table)
    assert np.all(np.diff(lum[:128]) > 0) and np.all(np.diff(lum[128:]) < 0)  # lightest at the centre
    np.testing.assert_allclose(lum[:128], lum[::-1][:128], atol=0.03)
    assert table[127].min() > 225  # near white
    assert table[0, 2] > table[0, 0] and table[-1, 0] > table[-1, 2]  # blue for negative, red for positive


def test_colourise_clips_and_marks_nonfinite():
    rgb = cv.colourise(np.array([[-5.0, 0.0, 5.0, np.nan, np.inf, -np.inf]]), "diverging", -1.0, 1.0)
    table = cv.colour_table("diverging")
    np.testing.assert_array_equal(rgb[0, 0], table[0])
    np.testing.assert_array_equal(rgb[0, 2], table[255])
    for column in (3, 4, 5):
        assert tuple(rgb[0, column]) == cv.BAD_RGB


def test_unknown_colour_map():
    with pytest.raises(ValueError, match="sequential"):
        cv.colour_table("jet")


# --- resampling and ticks -----------------------------------------------------------------------------
def test_resample_enlarges_by_repeating_cells():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = cv.resample(values, 4, 6)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(values, 2, 0), 2, 1))


def test_resample_shrinks_by_averaging_and_keeps_every_nan():
    values = np.ones((3, 1000), dtype=np.float32)
    values[1, 537] = np.nan  # one bad cell among 3000 must stay visible in a 3 x 100 picture
    values[2, :10] = 3.0
    out = cv.resample(values, 3, 100)
    assert out.shape == (3, 100)
    assert np.isnan(out[1]).sum() == 1
    assert out[2, 0] == pytest.approx(3.0) and out[0, 50] == pytest.approx(1.0)


@pytest.mark.parametrize(("low", "high", "most"), [(0, 99, 6), (0, 7, 6), (0, 2047, 9), (3, 3, 5), (0, 1, 3)])
def test_nice_ticks_are_round_inside_and_few(low, high, most):
    ticks = cv.nice_ticks(low, high, most, integer=True)
    assert 1 <= len(ticks) <= most
    assert ticks.min() >= low and ticks.max() <= high
    assert np.allclose(ticks, np.round(ticks))
    if len(ticks) > 1:
        step = ticks[1] - ticks[0]
        assert np.allclose(np.diff(ticks), step)
        assert step / 10 ** math.floor(math.log10(step)) in (1, 2, 2.5, 5)


def test_log_ticks_are_powers_of_ten():
    ticks = cv.log_ticks(3e-9, 20.0, most=5)
    assert len(ticks) <= 5 and ticks.min() >= 3e-9 and ticks.max() <= 20
    np.testing.assert_allclose(np.log10(ticks), np.round(np.log10(ticks)))
    assert cv.format_log_tick(1e-3) == "1e-3" and cv.format_log_tick(10.0) == "10"


# --- canvas -------------------------------------------------------------------------------------------
def test_paste_fills_the_box_exactly():
    canvas = cv.Canvas(40, 30)
    cells = np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    canvas.paste((10, 5, 30, 25), cells)
    pixels = canvas.to_array()
    assert (pixels[5:25, 10:20] == [255, 0, 0]).all() and (pixels[5:25, 20:30] == [0, 0, 255]).all()
    assert (pixels[:5] == 255).all() and (pixels[:, :10] == 255).all() and (pixels[25:] == 255).all()


def test_text_lands_at_its_anchor_and_rotated_text_reads_upwards():
    canvas = cv.Canvas(200, 200)
    canvas.text((100, 20), "step", 12, anchor="ma")
    canvas.text((50, 150), "unit", 12, anchor="mm", rotate=True)
    ink = canvas.to_array().min(-1) < 128
    rows, cols = np.nonzero(ink[:60])
    assert 20 <= rows.min() <= 24 and abs((cols.min() + cols.max()) / 2 - 100) <= 2
    rows, cols = np.nonzero(ink[60:])
    assert abs((rows.min() + rows.max()) / 2 + 60 - 150) <= 2 and abs((cols.min() + cols.max()) / 2 - 50) <= 2
    assert rows.max() - rows.min() > cols.max() - cols.min()  # taller than wide: it was turned


def test_markers_blend_and_stay_inside():
    canvas = cv.Canvas(20, 20)
    canvas.markers(np.array([5.0, -10.0, 500.0]), np.array([5.0, 3.0, 3.0]), (0, 0, 0), radius=1.5, alpha=0.5)
    pixels = canvas.to_array()
    assert tuple(pixels[5, 5]) == (128, 128, 128)
    rows, cols = np.nonzero(pixels.min(-1) < 255)
    assert np.hypot(rows - 5, cols - 5).max() <= 2.5  # only the one visible dot was painted


def test_scale_two_halves_back_to_the_requested_size():
    canvas = cv.Canvas(50, 30, scale=2)
    canvas.line([(0, 15), (50, 15)], (0, 0, 0), width=1)
    assert canvas.to_array().shape == (30, 50, 3)


def test_fine_smooths_curves_inside_its_box_and_keeps_what_was_there():
    """Inside `fine(box)` a slanted line comes out anti-aliased (grey levels between ink and paper); what
    was painted in the box before stays as it was; text and lines outside stay one-pixel sharp."""
    canvas = cv.Canvas(80, 60)
    canvas.rectangle((10, 10, 70, 50), fill=(200, 220, 240))
    canvas.line([(0, 55), (80, 58)], (0, 0, 0), width=1)  # outside the box: drawn at the final size
    sharp = cv.Canvas(80, 60)
    sharp.rectangle((10, 10, 70, 50), fill=(200, 220, 240))
    sharp.line([(0, 55), (80, 58)], (0, 0, 0), width=1)
    with canvas.fine((10, 10, 70, 50), margin=0):
        assert canvas.scale == cv.FINE and canvas.origin == (10, 10)
        canvas.line([(12, 15), (68, 45)], (0, 0, 0), width=1.3)
        sharp_inside = canvas.image.size == (60 * cv.FINE, 40 * cv.FINE)
    sharp.line([(12, 15), (68, 45)], (0, 0, 0), width=1.3)
    assert sharp_inside and canvas.scale == 1 and canvas.origin == (0, 0)
    pixels, jagged = canvas.to_array(), sharp.to_array()
    levels = lambda img: len(np.unique(img[10:50, 10:70].reshape(-1, 3), axis=0))  # noqa: E731
    assert levels(pixels) >= levels(jagged) + 2  # intermediate shades along the line (2x2 coverage)
    assert (pixels[11, 60] == (200, 220, 240)).all()  # the fill away from the line is unchanged
    assert (pixels[50:] == jagged[50:]).all()  # below the box: the same sharp line as without `fine`


def test_scatter_stamps_groups_in_order_as_markers_do():
    xs, ys = np.array([5.0, 9.0, 14.0]), np.array([5.0, 8.0, 12.0])
    one = cv.Canvas(20, 20)
    one.markers(xs, ys, (200, 0, 0), radius=2, alpha=0.6)
    one.markers(xs + 1, ys, (0, 0, 200), radius=2, alpha=0.6)
    both = cv.Canvas(20, 20)
    both.scatter([(xs, ys, (200, 0, 0)), (xs + 1, ys, (0, 0, 200))], radius=2, alpha=0.6)
    assert (one.to_array() == both.to_array()).all()


# --- pictures -----------------------------------------------------------------------------------------
def _check(rgb: np.ndarray) -> None:
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[1] <= 800 and rgb.shape[0] <= 800
    assert len(encode_png(rgb)) < MAX_PNG_BYTES
    Image.open(io.BytesIO(encode_png(rgb))).verify()


@pytest.mark.parametrize(("layers", "directions"), [(1, 1), (2, 2), (3, 1)])
def test_paint_hidden_shows_the_diverging_map_and_a_colour_bar(rnn_record, layers, directions):
    record = rnn_record("GRU", layers=layers, directions=directions, hidden=80)
    rgb = paint.paint_hidden(render.reduce_hidden(record, top_k=64), step=3)
    _check(rgb)
    table = cv.colour_table("diverging")
    assert _count_colour(rgb, tuple(table[0])) > 50  # the colour bar's dark blue end at least
    assert not _count_colour(rgb, cv.BAD_RGB)


def test_paint_hidden_marks_nan_in_magenta(rnn_record):
    record = rnn_record("LSTM", time=30)
    record.hidden[0, 0, 4, 2] = float("nan")
    payload = render.reduce_hidden(record)
    assert payload["nonfinite"] == "NaN"
    assert _count_colour(paint.paint_hidden(payload), cv.BAD_RGB) > 4


def test_paint_hidden_long_sequence_and_many_units(rnn_record):
    record = rnn_record("GRU", time=1500, hidden=300, batch=1, lengths=[1500])
    rgb = paint.paint_hidden(render.reduce_hidden(record, top_k=64, max_time=256))
    _check(rgb)


def test_paint_hidden_with_token_labels(rnn_record):
    record = rnn_record("GRU", time=12, batch=1, lengths=[12])
    tokens = [f"token{i}" for i in range(12)]
    _check(paint.paint_hidden(render.reduce_hidden(record, labels=tokens)))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_paint_gates_draws_each_gate_in_its_colour(rnn_record, kind):
    record = rnn_record(kind, layers=2, directions=2, hidden=16)
    payload = render.reduce_gates(record)
    rgb = paint.paint_gates(payload, step=1)
    _check(rgb)
    for g, gate in enumerate(payload["gates"]):
        assert _count_colour(rgb, paint.gate_colour(gate, g), tolerance=25) > 20, gate


def test_paint_grad_norm_zero_and_nonfinite_marks(rnn_record):
    record = rnn_record("GRU", layers=2, directions=2, time=30)
    record.hidden_grad[:, :, 5] = 0.0
    record.hidden_grad[0, 0, 9, 0] = float("inf")
    payload = render.reduce_grad_norm(record)
    rgb = paint.paint_grad_norm(payload, step=2)
    _check(rgb)
    reddish = (rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert reddish.sum() > 5  # the cross at the top edge and its legend entry
    assert _count_colour(rgb, cv.palette(1), tolerance=25) > 20  # layer 1's colour


def test_paint_grad_norm_one_colour_per_direction_and_near_zero_rows_apart():
    """A bidirectional many-to-one module: forward in the first colour, reverse in the second, whatever the
    layer; the reverse row's zeros and the forward row's steps below 1e-7 of its peak are triangles in two
    rows on the floor, not at 1e-20."""
    t = np.arange(40, dtype=np.float32)
    forward = 10.0 ** ((t - 39) / 2)  # down to 1e-19.5 of the peak
    reverse = np.where(t == 39, 2.0, 0.0)
    grad = torch.zeros(2, 1, 40, 1)
    grad[:, 0, :, 0] = torch.from_numpy(np.stack([forward, reverse]).astype(np.float32))
    record = RNNRecord("rnn", "LSTM", torch.zeros(2, 1, 40, 1), {}, grad, None, None, torch.tensor([40]),
                       num_directions=2)
    payload = render.reduce_grad_norm(record)
    rgb = paint.paint_grad_norm(payload)
    _check(rgb)
    assert _count_colour(rgb, cv.palette(0), tolerance=25) > 20  # forward
    assert _count_colour(rgb, cv.palette(1), tolerance=25) > 20  # reverse: its own colour, though layer 0
    shown = render.gradients._above_resolution(payload["norm"])
    assert render.gradients.near_zero_lanes(payload["norm"], shown) == [0, 1]
    floor, _ = render.gradients._log_limits(payload["norm"])
    assert floor > 1e-8


def test_legend_draws_each_line_style_apart():
    canvas = cv.Canvas(160, len(cv.DASHES) * cv.LEGEND_ROW + 10)
    cv.legend(canvas, (0, 0), [(style, (0, 0, 0), style) for style in cv.DASHES])
    rows = [canvas.to_array()[round(r * cv.LEGEND_ROW + cv.LEGEND_ROW / 2), :cv.LEGEND_KEY, 0] < 128
            for r in range(len(cv.DASHES))]
    inked = [int(row.sum()) for row in rows]
    assert inked[0] == max(inked) and len(set(inked)) == len(inked)  # solid inks the most; no two alike


def test_paint_grad_decay_matches_draw_grad_decay_inputs_and_errors(rnn_record):
    record = rnn_record("LSTM", layers=2, time=25)
    history = {epoch: record.grad_norm * 10.0**-epoch for epoch in range(20)}
    labels = [record.layer_label(i) for i in range(2)]
    _check(paint.paint_grad_decay(history, "encoder.rnn", labels, step=5))
    _check(paint.paint_grad_decay({0: record.grad_norm}, "encoder.rnn", labels))
    with pytest.raises(ValueError, match="empty"):
        paint.paint_grad_decay({}, "x", labels)
    with pytest.raises(ValueError, match="expected"):
        paint.paint_grad_decay({0: torch.ones(3, 4)}, "x", labels)


@pytest.mark.parametrize("heads", [1, 4, 8])
def test_paint_attention(attention_record, heads):
    record = attention_record(heads=heads, queries=9, keys=300, key_lengths=[300, 200])
    rgb = paint.paint_attention(render.reduce_attention(record, max_heads=8, max_steps=128), step=4)
    _check(rgb)
    assert _count_colour(rgb, tuple(cv.colour_table("sequential")[0])) > 50


def test_empty_inputs_give_a_message_picture(rnn_record):
    record = rnn_record("GRU", time=5, batch=1, lengths=[5])
    payload = render.reduce_hidden(record)
    payload["values"] = payload["values"][:, :, :0]
    rgb = paint.paint_hidden(payload)
    assert rgb.shape[1] == paint.WIDTH and rgb.shape[0] < 200


def test_titles_are_not_mathtext_escaped():
    payload = {"exact": False, "notes": ("a $5 note",)}
    title = render.common.compose_title("cost $x", payload, 3, "NaN", escape=False)
    assert "$x" in title and "\\$" not in title and "contains NaN" in title and "approximate" in title



def test_text_cache_keeps_labels_but_not_titles_with_steps(rnn_record):
    """Titles carry the step: caching them would grow the cache (and the process) with every recording."""
    payload = render.reduce_hidden(rnn_record("GRU"))
    paint.paint_hidden(payload, step=0)
    before = cv._text_mask.cache_info().currsize
    for step in range(1, 40):
        paint.paint_hidden(payload, step=step)
    assert cv._text_mask.cache_info().currsize == before
    # The title's heading (longer than any tick label) is drawn from the cache, only its step anew: asking
    # for the heading's mask again finds it there.
    heading = f"{payload['name']}: hidden state h_t, sequence {payload['sample']}"
    assert len(heading) > 24
    hits = cv._text_mask.cache_info().hits
    cv._text_mask(heading, cv.TITLE_SIZE, "la", False)
    assert cv._text_mask.cache_info().currsize == before and cv._text_mask.cache_info().hits == hits + 1
