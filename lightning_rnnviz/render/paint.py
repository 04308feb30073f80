"""The ``"fast"`` renderer: each ``paint_*`` takes the payload of the matching ``reduce_*`` and returns an
``(H, W, 3)`` uint8 picture, painted with numpy and Pillow in a few milliseconds (a matplotlib figure
costs 70-300 ms). The pictures show what the matplotlib ``draw_*`` figures show: the same panels, axes,
colour bars, legends, NaN/Inf marks and titles.

Example::

    >>> import torch
    >>> from lightning_rnnviz.probe.records import RNNRecord
    >>> from lightning_rnnviz.render import paint_hidden, reduce_hidden
    >>> h = torch.rand(1, 2, 30, 16) - 0.5  # (layers*directions, batch, time, hidden)
    >>> rec = RNNRecord("rnn", "GRU", h, {}, None, None, None, torch.tensor([30, 20]))
    >>> picture = paint_hidden(reduce_hidden(rec, sample=1), step=10)
    >>> picture.dtype, picture.shape[1:]
    (dtype('uint8'), (800, 3))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_rnnviz.render import canvas as cv
from lightning_rnnviz.render import common
from lightning_rnnviz.render.attention import attention_heading, axis_titles
from lightning_rnnviz.render.gates import TANH_GATES
from lightning_rnnviz.render.gradients import (
    LANE_PX,
    NEAR_ZERO_LABEL,
    _above_resolution,
    _finite_runs,
    _log_limits,
    decay_curves,
    horizon_entries,
    horizon_text,
    near_zero_lanes,
    row_style,
)

WIDTH = 800
MAX_HEIGHT = 800
NONFINITE_RGB = (220, 0, 0)
_GATE_ORDER = ("input", "forget", "cell", "output", "reset", "update", "new")


def _title(heading: str, payload: Mapping[str, Any], step: int | None, nonfinite: str,
           validation: bool = False) -> str:
    return common.compose_title(heading, dict(payload), step, nonfinite, escape=False, validation=validation)


def _aligned_time_axis(alignment: str, steps: int, width: int, count: int) -> tuple[np.ndarray, list[str], str]:
    """Tick positions, their labels and the axis title of a gradient curve's time axis of ``steps`` steps:
    step numbers, or (``alignment`` ``"end"``) steps before each sequence's end, 0 at the last column."""
    if alignment != "end":
        ticks = cv.nice_ticks(0, max(steps - 1, 0), count, integer=True)
        return ticks, [str(int(v)) for v in ticks], _time_label(width)
    last = max(steps - 1, 0)
    ticks = cv.nice_ticks(-last, 0, count, integer=True)
    label = "steps before each sequence's end" + ("" if width == 1 else f" (bins of {width})")
    return ticks + last, [str(int(v)) for v in ticks], label


def _time_label(width: int) -> str:
    return "time step" if width == 1 else f"time (bins of {width} steps)"


def _label_room(canvas: cv.Canvas, labels: Sequence[str] | None, size: int = cv.TICK_SIZE - 1) -> float:
    """Pixels that the longest of ``labels`` (shortened to 12 characters) needs."""
    if not labels:
        return 0.0
    return max(canvas.text_width(_short(label), size) for label in labels)


def _short(text: str, limit: int = 12) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 2] + ".."


def _nonfinite_key(canvas: cv.Canvas, nonfinite: str, y: float) -> None:
    """The magenta NaN/Inf key at the top right of a heatmap figure."""
    if nonfinite:
        cv.legend(canvas, (canvas.width - 130, y), [(nonfinite, cv.BAD_RGB, "s")], column_width=125)


def paint_message(title: str, message: str) -> np.ndarray:
    """A small picture that says why there is nothing to draw."""
    canvas = cv.Canvas(600, 160)
    below = cv.title_block(canvas, title)
    canvas.text((300, (below + 160) / 2), canvas.fit_text(message, cv.LABEL_SIZE + 1, 580), cv.LABEL_SIZE + 1,
                anchor="mm")
    return canvas.to_array()


def _layout_rows(count: int, top: float, bottom: float, panel: float, gap: float) -> tuple[float, float]:
    """Panel height and figure height for ``count`` rows, shrinking panels to stay within MAX_HEIGHT."""
    height = top + bottom + count * panel + (count - 1) * gap
    if height > MAX_HEIGHT:
        panel = max((MAX_HEIGHT - top - bottom - (count - 1) * gap) / count, 30.0)
        height = top + bottom + count * panel + (count - 1) * gap
    return panel, height


# --- hidden state ------------------------------------------------------------------------------------
def paint_hidden(payload: Mapping[str, Any], *, step: int | None = None, title: str | None = None,
                 validation: bool = False) -> np.ndarray:
    """Heatmap of ``h_t``, units x time, one panel per layer (rows) and direction (columns).

    Args:
        payload: from :func:`~lightning_rnnviz.render.reduce_hidden`.
        step: training step for the title (``train step <n>``).
        title: replaces the heading ``"<module>: hidden state h_t, sequence <n>"``.
        validation: the picture shows the validation sample (``validation at train step <n>``).
    """
    heading = title or f"{payload['name']}: hidden state h_t, sequence {payload['sample']}"
    nonfinite = payload["nonfinite"]
    full_title = _title(heading, payload, step, nonfinite, validation)
    values = payload["values"]
    rows, units, columns = values.shape
    if columns == 0 or units == 0:
        return paint_message(full_title, f"sequence {payload['sample']} has no valid steps")
    nrows, ncols = payload["num_layers"], payload["num_directions"]
    tokens, width = payload["labels"], payload["bin"]
    probe = cv.Canvas(1, 1)
    top = 34 + 18 * full_title.count("\n") + 20
    bottom = 48 + _label_room(probe, tokens)
    left, right, gap_x = 62, 100, 60
    panel_h, height = _layout_rows(nrows, top, bottom, 150, 40)
    canvas = cv.Canvas(WIDTH, math.ceil(height))
    cv.title_block(canvas, full_title)
    _nonfinite_key(canvas, nonfinite, top - 38)
    panel_w = (WIDTH - left - right - gap_x * (ncols - 1)) / ncols
    limit = payload["limit"]
    selected = payload["hidden_out"] > units
    time_ticks = cv.nice_ticks(0, max(columns * width - 1, 0), 6, integer=True)
    for index in range(rows):
        layer, direction = divmod(index, ncols)
        x0 = left + direction * (panel_w + gap_x)
        y0 = top + layer * (panel_h + 40)
        panel = cv.Panel(canvas, (x0, y0, x0 + panel_w, y0 + panel_h), (-0.5, columns * width - 0.5),
                         (-0.5, units - 0.5), yflip=True)
        panel.heatmap(values[index], "diverging", -limit, limit)
        for start in payload.get("call_starts", ()):
            # where the next call (a decoder from the encoder's state) begins
            x = float(panel.x(start - 0.5))
            canvas.line([(x, y0), (x, y0 + panel_h)], cv.TEXT_RGB, width=2, dash=4)
        panel.frame()
        right_title = f"top {units} of {payload['hidden_out']} units by variance" if selected else ""
        panel.title(payload["row_labels"][index], right_title)
        ticks = common.tick_positions(units, 5)
        panel.yticks(ticks, [str(u) for u in payload["units"][index][ticks]])
        if direction == 0:
            panel.ylabel("unit", offset=44)
        last = layer == nrows - 1
        if tokens:
            most = max(4, int(panel_w / 13))
            shown = common.tick_positions(columns, most)
            panel.xticks(shown, [_short(tokens[t]) for t in shown] if last else [""] * len(shown),
                         rotate=True, size=cv.TICK_SIZE - 1)
        else:
            panel.xticks(time_ticks, [str(int(v)) for v in time_ticks] if last else [""] * len(time_ticks))
        if last:
            panel.xlabel(_time_label(width), offset=bottom - 22)
    label = "h_t" + (" (tanh range)" if payload["bounded"] else "")
    cv.colour_bar(canvas, (WIDTH - 84, top, WIDTH - 70, height - bottom), "diverging", -limit, limit, label)
    return canvas.to_array()


# --- gates -------------------------------------------------------------------------------------------
def gate_colour(gate: str, index: int) -> tuple[int, int, int]:
    """The colour of ``gate`` (fixed per gate name, so a gate keeps its colour across modules)."""
    return cv.palette(_GATE_ORDER.index(gate) if gate in _GATE_ORDER else index)


def paint_gates(payload: Mapping[str, Any], *, step: int | None = None, title: str | None = None,
                validation: bool = False) -> np.ndarray:
    """Left: mean activation of each gate over time; right: per-unit saturation fractions (Karpathy et al.,
    2015); one row of panels per layer/direction. See :func:`~lightning_rnnviz.render.draw_gates`."""
    heading = title or f"{payload['name']}: gate activations"
    nonfinite = payload["nonfinite"]
    full_title = _title(heading, payload, step, nonfinite, validation)
    mean = payload["mean"]
    rows, _, columns = mean.shape
    if columns == 0:
        return paint_message(full_title, "no valid steps")
    names = payload["gates"]
    top = 34 + 18 * full_title.count("\n") + 44
    bottom, left, gap_y = 50, 62, 44
    panel_h, height = _layout_rows(rows, top, bottom, 130, gap_y)
    canvas = cv.Canvas(WIDTH, math.ceil(height))
    below = cv.title_block(canvas, full_title)
    entries = [(gate + (" (tanh)" if gate in TANH_GATES else ""), gate_colour(gate, g), "-")
               for g, gate in enumerate(names)]
    column_width = 110
    cv.legend(canvas, ((WIDTH - column_width * len(entries)) / 2, below + 4), entries, columns=len(entries),
              column_width=column_width)
    width = payload["bin"]
    x = np.arange(columns) * width + (width - 1) / 2
    has_tanh = any(gate in TANH_GATES for gate in names)
    y_range = (-1.05, 1.05) if has_tanh else (-0.03, 1.03)
    y_ticks = np.array((-1.0, -0.5, 0.0, 0.5, 1.0) if has_tanh else (0.0, 0.5, 1.0))
    scatter_w = min(panel_h, 190)
    curves_x1 = WIDTH - 30 - scatter_w - 80
    shown, size = payload["units_shown"], payload["hidden_size"]
    units = f"{shown} units" if shown == size else f"{shown} of {size} units"
    time_ticks = cv.nice_ticks(0, max(columns * width - 1, 0), 7, integer=True)
    for r in range(rows):
        y0 = top + r * (panel_h + gap_y)
        last = r == rows - 1
        curves = cv.Panel(canvas, (left, y0, curves_x1, y0 + panel_h), (-0.5, columns * width - 0.5), y_range)
        curves.hgrid(y_ticks)
        with canvas.fine(curves.box):
            for g, gate in enumerate(names):
                for run in _finite_segments(mean[r, g]):
                    canvas.line(np.column_stack((curves.x(x[run]), curves.y(mean[r, g][run]))),
                                gate_colour(gate, g), width=1.3)
        curves.frame()
        curves.yticks(y_ticks)
        curves.xticks(time_ticks, [str(int(v)) for v in time_ticks] if last else [""] * len(time_ticks))
        curves.ylabel("mean activation", offset=40)
        curves.title(payload["row_labels"][r])
        if last:
            curves.xlabel(_time_label(width))

        sx0 = WIDTH - 30 - scatter_w
        scatter = cv.Panel(canvas, (sx0, y0, sx0 + scatter_w, y0 + panel_h), (-0.02, 1.02), (-0.02, 1.02))
        corner = [(scatter.x(0.0), scatter.y(0.0)), (scatter.x(1.0), scatter.y(0.0)), (scatter.x(0.0), scatter.y(1.0))]
        with canvas.fine(scatter.box):
            canvas.polygon([(float(a), float(b)) for a, b in corner], fill=(237, 237, 237))
            canvas.scatter([(scatter.x(payload["low"][r, g]), scatter.y(payload["high"][r, g]), gate_colour(gate, g))
                            for g, gate in enumerate(names)], radius=1.5, alpha=0.6)
        scatter.frame()
        scatter.yticks(np.array((0.0, 0.5, 1.0)))
        scatter.xticks(np.array((0.0, 0.5, 1.0)))
        scatter.ylabel("right-saturated", offset=34)
        scatter.title(f"saturation, {units}")
        if last:
            scatter.xlabel("left-saturated (fraction of steps)")
    return canvas.to_array()


def _finite_segments(values: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the runs of finite values (a lone point is a run of one)."""
    good = np.isfinite(values)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], good.astype(np.int8), [0]))))
    return [np.arange(start, stop) for start, stop in zip(edges[::2], edges[1::2])]


# --- gradient norms ----------------------------------------------------------------------------------
def _log_curve(canvas: cv.Canvas, panel: cv.Panel, x: np.ndarray, values: np.ndarray, shown: np.ndarray,
               floor: float, colour: tuple[int, int, int], dash: float = 0.0, width: float = 1.4,
               lane: int = 0) -> None:
    """A curve on a log axis through the ``shown`` values; the other finite ones (zero, or below the
    resolution of the curve's peak) as triangles on the floor, ``lane`` rows up
    (:func:`~lightning_rnnviz.render.gradients.near_zero_lanes`); NaN/Inf as crosses along the top edge;
    lone points as dots."""
    for run in _finite_segments(np.where(shown, values, np.nan)):
        points = np.column_stack((panel.x(x[run]), panel.y(values[run])))
        if len(run) == 1:
            canvas.markers(points[:, 0], points[:, 1], colour, radius=2.5)
        else:
            canvas.line(points, colour, width=width, dash=dash)
    near_zero = np.isfinite(values) & ~shown
    if near_zero.any():
        y = float(panel.y(floor)) - lane * LANE_PX
        canvas.markers(panel.x(x[near_zero]), np.full(int(near_zero.sum()), y), colour, radius=3.5, shape="v")
    bad = ~np.isfinite(values)
    if bad.any():
        canvas.markers(panel.x(x[bad]), np.full(int(bad.sum()), panel.box[1] + 6), NONFINITE_RGB, radius=3,
                       shape="x")


def _log_axis(panel: cv.Panel, floor: float, ceiling: float) -> np.ndarray:
    """Decade ticks of a log panel, with light grid lines at them."""
    ticks = cv.log_ticks(floor / 2, ceiling * 2, 7)
    panel.hgrid(ticks)
    return ticks


def paint_grad_norm(payload: Mapping[str, Any], *, step: int | None = None, title: str | None = None,
                    validation: bool = False) -> np.ndarray:
    """``||dL/dh_t||_2`` (mean over valid sequences) against ``t`` on a log axis, one line per
    layer/direction; colour tells the layer, or in a bidirectional module the direction, and the line style
    the layer (:func:`~lightning_rnnviz.render.gradients.row_style`). Values below 1e-7 of their curve's
    peak, zeros included, are triangles on the floor; the axis spans the rest."""
    heading = title or f"{payload['name']}: gradient norm per time step"
    nonfinite = payload["nonfinite"]
    full_title = _title(heading, payload, step, nonfinite, validation)
    norm = payload["norm"]
    rows, columns = norm.shape
    if columns == 0:
        return paint_message(full_title, "no valid steps")
    top = 34 + 18 * full_title.count("\n") + 14
    canvas = cv.Canvas(WIDTH, 450)
    cv.title_block(canvas, full_title)
    width = payload["bin"]
    x = np.arange(columns) * width + (width - 1) / 2
    floor, ceiling = _log_limits(norm)
    shown = _above_resolution(norm)
    lanes = near_zero_lanes(norm, shown)
    panel = cv.Panel(canvas, (80, top, WIDTH - 190, 450 - 52), (-0.5, columns * width - 0.5),
                     (floor / 2, ceiling * 2), ylog=True)
    ticks = _log_axis(panel, floor, ceiling)
    entries = []
    with canvas.fine(panel.box):
        for r in range(rows):
            colour, style = row_style(r, payload["num_directions"])
            _log_curve(canvas, panel, x, norm[r], shown[r], floor, cv.palette(colour), dash=cv.DASHES[style],
                       lane=lanes[r])
            entries.append((payload["row_labels"][r], cv.palette(colour), style))
    if (np.isfinite(norm) & ~shown).any():
        entries.append((NEAR_ZERO_LABEL, cv.MUTED_RGB, "v"))
    if nonfinite:
        entries.append((nonfinite, NONFINITE_RGB, "x"))
    panel.frame()
    panel.yticks(ticks, [cv.format_log_tick(v) for v in ticks])
    positions, labels, axis_label = _aligned_time_axis(payload.get("alignment", "start"), columns * width, width, 9)
    panel.xticks(positions, labels)
    panel.xlabel(axis_label)
    panel.ylabel("||dL/dh_t||, mean over sequences", offset=52)
    cv.legend(canvas, (WIDTH - 180, top), entries, column_width=175)
    return canvas.to_array()


def paint_grad_decay(
    history: Mapping[int, Any],
    name: str,
    layer_labels: Sequence[str],
    *,
    step: int | None = None,
    title: str | None = None,
    max_curves: int = 16,
    horizons: Mapping[int, Sequence[float | None]] | None = None,
    notes: Sequence[str] = (),
    alignment: str = "start",
) -> np.ndarray:
    """Gradient norm per step, one line per epoch (colour: epoch), one panel per layer/direction; each
    panel's heading gives the gradient horizon of some of the epochs drawn (first and last among them).

    Arguments and errors as :func:`~lightning_rnnviz.render.draw_grad_decay`.
    """
    epochs, curves, total, flag = decay_curves(history, layer_labels, max_curves, alignment)
    rows = len(layer_labels)
    heading = title or f"{name}: gradient norm per time step, by epoch"
    if len(epochs) < total:
        heading += f" ({len(epochs)} of {total} epochs)"
    full_title = _title(heading, {"exact": not notes, "notes": tuple(notes)}, step, flag)
    length = max(v.shape[1] for v in curves.values())
    if length == 0:
        return paint_message(full_title, "no steps recorded")
    ncols = 1 if rows == 1 else 2
    nrows = math.ceil(rows / ncols)
    top = 34 + 18 * full_title.count("\n") + 14
    bottom, left, right, gap_x, gap_y = 50, 72, 100, 70, 44
    panel_h, height = _layout_rows(nrows, top, bottom, 200, gap_y)
    canvas = cv.Canvas(WIDTH, math.ceil(height))
    cv.title_block(canvas, full_title)
    panel_w = (WIDTH - left - right - gap_x * (ncols - 1)) / ncols
    floor, ceiling = _log_limits(*curves.values())
    low, high = epochs[0], epochs[-1]
    vmin, vmax = (low - 0.5, high + 0.5) if low == high else (low, high)
    table = cv.colour_table("sequential")
    time_ticks, time_labels, time_title = _aligned_time_axis(alignment, length, 1, 7)
    any_zero = False
    for r in range(rows):
        row, column = divmod(r, ncols)
        x0, y0 = left + column * (panel_w + gap_x), top + row * (panel_h + gap_y)
        panel = cv.Panel(canvas, (x0, y0, x0 + panel_w, y0 + panel_h), (-0.5, length - 0.5),
                         (floor / 2, ceiling * 2), ylog=True)
        ticks = _log_axis(panel, floor, ceiling)
        with canvas.fine(panel.box):
            for epoch in epochs:
                values = curves[epoch][r]
                near_zero = np.isfinite(values) & ~_above_resolution(values)
                any_zero = any_zero or bool(near_zero.any())
                colour = tuple(int(c) for c in table[round((epoch - vmin) / (vmax - vmin) * 255)])
                for run in _finite_runs(np.where(near_zero, floor, values)):
                    canvas.line(np.column_stack((panel.x(run[:, 0]), panel.y(run[:, 1]))), colour, width=1.1)
        panel.frame()
        panel.yticks(ticks, [cv.format_log_tick(v) for v in ticks])
        last = r >= rows - ncols
        panel.xticks(time_ticks, time_labels if last else [""] * len(time_ticks))
        entries = horizon_entries(horizons, epochs, r, most=4 if ncols == 1 else 3)
        panel.title(str(layer_labels[r]), right=horizon_text(entries))
        if column == 0:
            panel.ylabel("||dL/dh_t||", offset=48)
        if last:
            panel.xlabel(time_title)
    epoch_ticks = cv.nice_ticks(low, high, 6, integer=True) if high > low else np.array([low])
    cv.colour_bar(canvas, (WIDTH - 84, top, WIDTH - 70, height - bottom), "sequential", vmin, vmax, "epoch",
                  ticks=epoch_ticks, tick_labels=[str(int(e)) for e in epoch_ticks])
    if any_zero:
        canvas.text((6, height - 6), f"{NEAR_ZERO_LABEL} drawn at {floor:.0e}", cv.TICK_SIZE, anchor="ld", fill=cv.MUTED_RGB)
    return canvas.to_array()


# --- attention ---------------------------------------------------------------------------------------
def _bin_label(text: str, width: int) -> str:
    return text if width == 1 else f"{text} (bins of {width})"


def paint_attention(payload: Mapping[str, Any], *, step: int | None = None, title: str | None = None,
                    validation: bool = False) -> np.ndarray:
    """Heatmap per head (rows: query steps, columns: key steps) with one shared colour bar; only
    real steps are drawn: padded keys are cropped, and in self-attention padded queries
    (:func:`~lightning_rnnviz.render.reduce_attention`)."""
    heading = title or attention_heading(payload)
    weights = payload["weights"]
    if payload["heads"] > weights.shape[0]:
        heading += f" (showing {weights.shape[0]} of {payload['heads']} heads)"
    nonfinite = payload["nonfinite"]
    full_title = _title(heading, payload, step, nonfinite, validation)
    shown, rows, columns = weights.shape
    if rows == 0 or columns == 0:
        return paint_message(full_title, f"sequence {payload['sample']} has no real keys or queries")
    ncols = min(shown, 4)
    nrows = math.ceil(shown / ncols)
    query_tokens, key_tokens = payload["query_labels"], payload["key_labels"]
    probe = cv.Canvas(1, 1)
    top = 34 + 18 * full_title.count("\n") + 20
    left = 50 + max(_label_room(probe, query_tokens), 16)
    bottom = 48 + _label_room(probe, key_tokens)
    right, gap_x, gap_y = 100, 26, 34
    panel = min(260.0, (WIDTH - left - right - gap_x * (ncols - 1)) / ncols)
    panel, height = _layout_rows(nrows, top, bottom, panel, gap_y)
    # A grid narrower than the page (one or two heads) gets a narrower picture, its colour bar beside it.
    width = min(WIDTH, math.ceil(left + ncols * panel + (ncols - 1) * gap_x + right))
    canvas = cv.Canvas(max(width, 420), math.ceil(height))
    cv.title_block(canvas, full_title)
    _nonfinite_key(canvas, nonfinite, top - 38)
    query_bin, key_bin = payload["query_bin"], payload["key_bin"]
    query_axis, key_axis = axis_titles(payload)
    vmax = payload["vmax"]
    most = max(4, int(panel / 13))
    for h in range(shown):
        row, col = divmod(h, ncols)
        x0, y0 = left + col * (panel + gap_x), top + row * (panel + gap_y)
        box = (x0, y0, x0 + panel, y0 + panel)
        axes = cv.Panel(canvas, box, (-0.5, columns * key_bin - 0.5), (-0.5, rows * query_bin - 0.5), yflip=True)
        axes.heatmap(weights[h], "sequential", 0.0, vmax)
        axes.frame()
        axes.title(f"head {h}")
        first_col, last_row = col == 0, h + ncols >= shown
        if last_row:
            if key_tokens:
                ticks = common.tick_positions(columns, most)
                axes.xticks(ticks, [_short(key_tokens[t]) for t in ticks], rotate=True, size=cv.TICK_SIZE - 1)
            else:
                ticks = cv.nice_ticks(0, max(columns * key_bin - 1, 0), 5, integer=True)
                axes.xticks(ticks, [str(int(t)) for t in ticks])
            axes.xlabel(_bin_label(key_axis, key_bin), offset=bottom - 22)
        if first_col:
            if query_tokens:
                ticks = common.tick_positions(rows, most)
                axes.yticks(ticks, [_short(query_tokens[t]) for t in ticks], size=cv.TICK_SIZE - 1)
            else:
                ticks = cv.nice_ticks(0, max(rows * query_bin - 1, 0), 5, integer=True)
                axes.yticks(ticks, [str(int(t)) for t in ticks])
            axes.ylabel(_bin_label(query_axis, query_bin),
                        offset=max(_label_room(canvas, query_tokens), 16) + 20)
    label = "attention weight" + (" (sum over key bin)" if key_bin > 1 else "")
    grid_bottom = top + nrows * panel + (nrows - 1) * gap_y
    bar_x = left + ncols * panel + (ncols - 1) * gap_x + 16
    cv.colour_bar(canvas, (bar_x, top, bar_x + 14, grid_bottom), "sequential", 0.0, vmax, label)
    return canvas.to_array()


PAINTERS = {
    "hidden": paint_hidden,
    "gates": paint_gates,
    "grad_norm": paint_grad_norm,
    "attention": paint_attention,
}
