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
    (dtype('uint8'), (560, 3))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_rnnviz.render import canvas as cv
from lightning_rnnviz.render import common
from lightning_rnnviz.render.attention import attention_heading, axis_titles
from lightning_rnnviz.render.gates import TANH_GATES, saturation_shares
from lightning_rnnviz.render.gradients import (
    LANE_PX,
    NEAR_ZERO_LABEL,
    _above_resolution,
    _finite_runs,
    _log_limits,
    decay_curves,
    horizon_crossing,
    horizon_entries,
    horizon_text,
    near_zero_lanes,
    row_style,
)

WIDTH = 560
"""Pixels across every picture but a narrow attention grid: TensorBoard shows a picture about 350 px wide
in its image cards, so the type (:mod:`~lightning_rnnviz.render.canvas` sizes) is chosen for 0.625 of its
size."""
MAX_HEIGHT = 800
NONFINITE_RGB = (220, 0, 0)
_GATE_ORDER = ("input", "forget", "cell", "output", "reset", "update", "new")
CURVE_PX = 2.6  # width of a gradient or gate curve (1.6 px at card width)
DECAY_LINE_PX = 3.4  # width of a grad_decay epoch's line: 2.1 px at card width
MARGIN = 10  # pixels kept free at the picture's left and right edges
GAP = 12  # pixels between a panel's tick labels and what comes next
HORIZON_FRACTION = 0.01  # the level the grad_norm picture marks (as ``grad_horizon`` counts)
HORIZON_LABEL = "1% of peak"


def _title(heading: str, payload: Mapping[str, Any], step: int | None, nonfinite: str,
           validation: bool = False) -> str:
    # no wrapping here: `canvas.title_block` wraps the lines by their width in pixels
    return common.compose_title(heading, dict(payload), step, nonfinite, width=10_000, escape=False,
                                validation=validation)


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


def _ticks_across(pixels: float) -> int:
    """How many numeric tick labels fit along ``pixels`` of a horizontal axis."""
    return max(2, int(pixels / 58))


def _short(text: str, limit: int = 10) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 2] + ".."


def _label_room(canvas: cv.Canvas, labels: Sequence[str] | None, size: int = cv.TICK_SIZE) -> float:
    """Pixels that the longest of ``labels`` (shortened as :func:`_short` does) needs."""
    if not labels:
        return 0.0
    return max(canvas.text_width(_short(label), size) for label in labels)


def _first_fitting(canvas: cv.Canvas, candidates: Sequence[str], size: int, room: float) -> str:
    """The first of ``candidates`` that fits in ``room`` pixels at ``size`` (the last one, cut, if none)."""
    for text in candidates:
        if canvas.text_width(text, size) <= room:
            return text
    return canvas.fit_text(candidates[-1], size, room)


def _nonfinite_key(canvas: cv.Canvas, nonfinite: str, bottom: float) -> None:
    """The magenta NaN/Inf key at the bottom right of a heatmap figure, its last row at ``bottom``."""
    if nonfinite:
        entries = [(nonfinite, cv.BAD_RGB, "s")]
        width, height = cv.legend_size(canvas, entries)
        cv.legend(canvas, (canvas.width - width, bottom - height), entries, column_width=width)


def paint_message(title: str, message: str) -> np.ndarray:
    """A small picture that says why there is nothing to draw."""
    canvas = cv.Canvas(WIDTH, 1)
    lines = cv.wrap_text(canvas, message, cv.LABEL_SIZE + 1, WIDTH - 2 * MARGIN)
    below = cv.title_height(canvas, title)
    height = math.ceil(below + 24 + len(lines) * (cv.LABEL_SIZE + 7) + 24)
    canvas = cv.Canvas(WIDTH, height)
    y = cv.title_block(canvas, title) + 24
    for line in lines:
        canvas.text((WIDTH / 2, y), line, cv.LABEL_SIZE + 1, anchor="ma")
        y += cv.LABEL_SIZE + 7
    return canvas.to_array()


def _layout_rows(count: int, top: float, bottom: float, panel: float, gap: float) -> tuple[float, float]:
    """Panel height and figure height for ``count`` rows, shrinking panels to stay within MAX_HEIGHT."""
    height = top + bottom + count * panel + (count - 1) * gap
    if height > MAX_HEIGHT:
        panel = max((MAX_HEIGHT - top - bottom - (count - 1) * gap) / count, 30.0)
        height = top + bottom + count * panel + (count - 1) * gap
    return panel, height


PANEL_HEAD = cv.PANEL_TITLE_SIZE + 10  # pixels above a panel for its title
X_AXIS = cv.TICK_PX + cv.TICK_SIZE + 8 + cv.LABEL_SIZE + 8  # under a panel: tick labels and the axis title


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
    values = payload["values"]
    rows, units, columns = values.shape
    selected = payload["hidden_out"] > units
    if selected and columns:  # which units are shown: a line under the title
        payload = {**payload, "context": (*payload.get("context", ()),
                                          f"top {units} of {payload['hidden_out']} units by variance")}
    full_title = _title(heading, payload, step, nonfinite, validation)
    if columns == 0 or units == 0:
        return paint_message(full_title, f"sequence {payload['sample']} has no valid steps")
    nrows, ncols = payload["num_layers"], payload["num_directions"]
    tokens, width = payload["labels"], payload["bin"]
    probe = cv.Canvas(WIDTH, 1)
    top = cv.title_height(probe, full_title) + 6 + PANEL_HEAD
    unit_room = cv.tick_room(probe, [str(u) for u in np.asarray(payload["units"]).ravel()[-3:]] + ["000"])
    bottom = X_AXIS + (_label_room(probe, tokens) - cv.TICK_SIZE + 4 if tokens else 0) + 4
    limit = payload["limit"]
    label = "h_t" + (" (tanh range)" if payload["bounded"] else "")
    left = MARGIN + cv.LABEL_SIZE + 6 + unit_room
    right = cv.colour_bar_width(probe, -limit, limit) + 2 * MARGIN
    gap_x = unit_room + GAP
    panel_h, height = _layout_rows(nrows, top, bottom, 170 if nrows == 1 else 130, PANEL_HEAD + 8)
    canvas = cv.Canvas(WIDTH, math.ceil(height))
    cv.title_block(canvas, full_title)
    panel_w = (WIDTH - left - right - gap_x * (ncols - 1)) / ncols
    time_ticks = cv.nice_ticks(0, max(columns * width - 1, 0), _ticks_across(panel_w), integer=True)
    for index in range(rows):
        layer, direction = divmod(index, ncols)
        x0 = left + direction * (panel_w + gap_x)
        y0 = top + layer * (panel_h + PANEL_HEAD + 8)
        panel = cv.Panel(canvas, (x0, y0, x0 + panel_w, y0 + panel_h), (-0.5, columns * width - 0.5),
                         (-0.5, units - 0.5), yflip=True)
        panel.heatmap(values[index], "diverging", -limit, limit)
        for start in payload.get("call_starts", ()):
            # where the next call (a decoder from the encoder's state) begins
            x = float(panel.x(start - 0.5))
            canvas.line([(x, y0), (x, y0 + panel_h)], cv.TEXT_RGB, width=2.5, dash=5)
        panel.frame()
        panel.title(payload["row_labels"][index])
        ticks = common.tick_positions(units, max(2, int(panel_h / 30)))
        panel.yticks(ticks, [str(u) for u in payload["units"][index][ticks]])
        if direction == 0:
            panel.ylabel("unit", offset=unit_room + 4)
        last = layer == nrows - 1
        if tokens:
            shown_ticks = common.tick_positions(columns, max(3, int(panel_w / (cv.TICK_SIZE + 6))))
            panel.xticks(shown_ticks, [_short(tokens[t]) for t in shown_ticks] if last else [""] * len(shown_ticks),
                         rotate=True)
        else:
            panel.xticks(time_ticks, [str(int(v)) for v in time_ticks] if last else [""] * len(time_ticks))
        if last:
            panel.xlabel(_time_label(width), offset=bottom - cv.LABEL_SIZE - 10)
    grid_bottom = height - bottom
    bar_x = WIDTH - right + MARGIN
    cv.colour_bar(canvas, (bar_x, top, bar_x + cv.BAR_PX, grid_bottom), "diverging", -limit, limit, label)
    _nonfinite_key(canvas, nonfinite, height - 4)
    return canvas.to_array()


# --- gates -------------------------------------------------------------------------------------------
def gate_colour(gate: str, index: int) -> tuple[int, int, int]:
    """The colour of ``gate`` (fixed per gate name, so a gate keeps its colour across modules)."""
    return cv.palette(_GATE_ORDER.index(gate) if gate in _GATE_ORDER else index)


def _tint(colour: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """``colour`` mixed with white (``amount`` 0: the colour, 1: white)."""
    return tuple(round(c + (255 - c) * amount) for c in colour)


def _percent(share: float) -> str:
    value = 100 * share
    return "<1%" if 0 < value < 0.5 else (">99%" if 99.5 <= value < 100 else f"{value:.0f}%")


def paint_gates(payload: Mapping[str, Any], *, step: int | None = None, title: str | None = None,
                validation: bool = False) -> np.ndarray:
    """Left: mean activation of each gate over time; right: per gate, one bar of the share of units that
    are *closed* (left-saturated on most valid steps, the gate near its lower bound: Karpathy et al., 2015),
    *open* (right-saturated on most) and neither, with the percentages written where they fit; one row of
    panels per layer/direction. See :func:`~lightning_rnnviz.render.draw_gates`."""
    heading = title or f"{payload['name']}: gate activations"
    nonfinite = payload["nonfinite"]
    full_title = _title(heading, payload, step, nonfinite, validation)
    mean = payload["mean"]
    rows, _, columns = mean.shape
    if columns == 0:
        return paint_message(full_title, "no valid steps")
    names = payload["gates"]
    probe = cv.Canvas(WIDTH, 1)
    top = cv.title_height(probe, full_title) + 6 + PANEL_HEAD
    bar_h, bar_gap = cv.TICK_SIZE + 8, 6
    panel_h = max(len(names) * (bar_h + bar_gap) - bar_gap, 96)
    has_tanh = any(gate in TANH_GATES for gate in names)
    y_ticks = np.array((-1.0, 0.0, 1.0) if has_tanh else (0.0, 0.5, 1.0))
    y_labels = [cv.format_tick(v) for v in y_ticks]
    left = MARGIN + cv.LABEL_SIZE + 6 + cv.tick_room(probe, y_labels)
    bottom = X_AXIS + 4
    gap_y = PANEL_HEAD + 8
    panel_h, height = _layout_rows(rows, top, bottom, panel_h, gap_y)
    canvas = cv.Canvas(WIDTH, math.ceil(height))
    cv.title_block(canvas, full_title)
    names_w = max(canvas.text_width(gate, cv.TICK_SIZE) for gate in names)
    bars_x1 = WIDTH - MARGIN
    bars_x0 = bars_x1 - 190
    key_w = 18  # a line in the gate's colour before its name: the curves' legend (a bar may hold no colour)
    curves_x1 = bars_x0 - names_w - 8 - key_w - 6 - GAP - 6
    width = payload["bin"]
    x = np.arange(columns) * width + (width - 1) / 2
    y_range = (-1.05, 1.05) if has_tanh else (-0.03, 1.03)
    shown, size = payload["units_shown"], payload["hidden_size"]
    units = f"{shown} units" if shown == size else f"{shown} of {size} units"
    time_ticks = cv.nice_ticks(0, max(columns * width - 1, 0), _ticks_across(curves_x1 - left), integer=True)
    closed, opened = saturation_shares(payload["low"], payload["high"])
    for r in range(rows):
        y0 = top + r * (panel_h + gap_y)
        last = r == rows - 1
        curves = cv.Panel(canvas, (left, y0, curves_x1, y0 + panel_h), (-0.5, columns * width - 0.5), y_range)
        curves.hgrid(y_ticks)
        with canvas.fine(curves.box):
            for g, gate in enumerate(names):
                for run in _finite_segments(mean[r, g]):
                    canvas.line(np.column_stack((curves.x(x[run]), curves.y(mean[r, g][run]))),
                                gate_colour(gate, g), width=CURVE_PX)
        curves.frame()
        curves.yticks(y_ticks, y_labels)
        curves.xticks(time_ticks, [str(int(v)) for v in time_ticks] if last else [""] * len(time_ticks))
        curves.ylabel("mean", offset=cv.tick_room(canvas, y_labels) + 4)
        curves.title(payload["row_labels"][r])
        if last:
            curves.xlabel(_time_label(width))
        # the saturation bars: closed from the left, open from the right, neither in between
        canvas.text((bars_x0, y0 - 5), "closed", cv.TICK_SIZE, anchor="ld", fill=cv.MUTED_RGB)
        canvas.text((bars_x1, y0 - 5), "open", cv.TICK_SIZE, anchor="rd", fill=cv.MUTED_RGB)
        step_y = (panel_h - len(names) * bar_h) / max(len(names) - 1, 1) + bar_h
        for g, gate in enumerate(names):
            top_y = y0 + g * step_y if len(names) > 1 else y0 + (panel_h - bar_h) / 2
            middle = top_y + bar_h / 2
            colour = gate_colour(gate, g)
            canvas.text((bars_x0 - 8, middle), gate, cv.TICK_SIZE, anchor="rm")
            key_x1 = bars_x0 - 8 - canvas.text_width(gate, cv.TICK_SIZE) - 6
            canvas.line([(key_x1 - key_w, middle), (key_x1, middle)], colour, width=CURVE_PX)
            span = bars_x1 - bars_x0
            a = bars_x0 + span * float(closed[r, g])
            b = bars_x1 - span * float(opened[r, g])
            canvas.rectangle((bars_x0, top_y, bars_x1, top_y + bar_h), fill=(236, 236, 236))
            if a > bars_x0:
                canvas.rectangle((bars_x0, top_y, a, top_y + bar_h), fill=_tint(colour, 0.55))
            if b < bars_x1:
                canvas.rectangle((b, top_y, bars_x1, top_y + bar_h), fill=colour)
            canvas.rectangle((bars_x0, top_y, bars_x1, top_y + bar_h), outline=cv.FRAME_RGB)
            # each share inside its segment where it fits, else beside it in the grey middle
            free = [a, b]
            for share, x_left, x_right, fill, outside in ((closed[r, g], bars_x0, a, cv.TEXT_RGB, "l"),
                                                           (opened[r, g], b, bars_x1, (255, 255, 255), "r")):
                text = _percent(float(share))
                need = canvas.text_width(text, cv.TICK_SIZE) + 6
                if share <= 0:
                    continue
                if need <= x_right - x_left:
                    canvas.text(((x_left + x_right) / 2, middle), text, cv.TICK_SIZE, anchor="mm", fill=fill)
                elif need <= free[1] - free[0]:
                    if outside == "l":
                        canvas.text((free[0] + 3, middle), text, cv.TICK_SIZE, anchor="lm")
                        free[0] += need
                    else:
                        canvas.text((free[1] - 3, middle), text, cv.TICK_SIZE, anchor="rm")
                        free[1] -= need
        if last:
            canvas.text(((bars_x0 + bars_x1) / 2, y0 + panel_h + cv.TICK_PX + 3),
                        canvas.fit_text(f"% of {units}", cv.LABEL_SIZE, bars_x1 - bars_x0 + names_w), cv.LABEL_SIZE,
                        anchor="ma")
            canvas.text(((bars_x0 + bars_x1) / 2, y0 + panel_h + cv.TICK_PX + cv.TICK_SIZE + 8),
                        "on most steps", cv.LABEL_SIZE, anchor="ma")
    return canvas.to_array()


def _finite_segments(values: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the runs of finite values (a lone point is a run of one)."""
    good = np.isfinite(values)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], good.astype(np.int8), [0]))))
    return [np.arange(start, stop) for start, stop in zip(edges[::2], edges[1::2])]


# --- gradient norms ----------------------------------------------------------------------------------
def _log_curve(canvas: cv.Canvas, panel: cv.Panel, x: np.ndarray, values: np.ndarray, shown: np.ndarray,
               floor: float, colour: tuple[int, int, int], dash: float = 0.0, width: float = CURVE_PX,
               lane: int = 0) -> list[np.ndarray]:
    """A curve on a log axis through the ``shown`` values; the other finite ones (zero, or below the
    resolution of the curve's peak) as triangles on the floor, ``lane`` rows up
    (:func:`~lightning_rnnviz.render.gradients.near_zero_lanes`); NaN/Inf as crosses along the top edge;
    lone points as dots. Returns the pixel points drawn (for placing a legend)."""
    drawn = []
    for run in _finite_segments(np.where(shown, values, np.nan)):
        points = np.column_stack((panel.x(x[run]), panel.y(values[run])))
        if len(run) == 1:
            canvas.markers(points[:, 0], points[:, 1], colour, radius=3.5)
        else:
            canvas.line(points, colour, width=width, dash=dash)
        drawn.append(points)
    near_zero = np.isfinite(values) & ~shown
    if near_zero.any():
        y = float(panel.y(floor)) - lane * LANE_PX * 1.5
        xs = panel.x(x[near_zero])
        canvas.markers(xs, np.full(int(near_zero.sum()), y), colour, radius=5, shape="v")
        drawn.append(np.column_stack((xs, np.full(xs.shape, y))))
    bad = ~np.isfinite(values)
    if bad.any():
        xs = panel.x(x[bad])
        canvas.markers(xs, np.full(int(bad.sum()), panel.box[1] + 8), NONFINITE_RGB, radius=5, shape="x")
        drawn.append(np.column_stack((xs, np.full(xs.shape, panel.box[1] + 8))))
    return drawn


def _log_axis(panel: cv.Panel, floor: float, ceiling: float) -> np.ndarray:
    """Decade ticks of a log panel, with light grid lines at them."""
    ticks = cv.log_ticks(floor / 2, ceiling * 2, max(2, int((panel.box[3] - panel.box[1]) / 40)))
    panel.hgrid(ticks)
    return ticks


def paint_grad_norm(payload: Mapping[str, Any], *, step: int | None = None, title: str | None = None,
                    validation: bool = False) -> np.ndarray:
    """``||dL/dh_t||_2`` (mean over valid sequences) against ``t`` on a log axis, one line per
    layer/direction; colour tells the layer, or in a bidirectional module the direction, and the line style
    the layer (:func:`~lightning_rnnviz.render.gradients.row_style`). Values below 1e-7 of their curve's
    peak, zeros included, are triangles on the floor; the axis spans the rest. A dashed line in each
    curve's colour marks 1 % of its peak, and a dot where the curve, followed back from where its direction
    ends, first falls below it: the gradient horizon of the drawn curve
    (:func:`~lightning_rnnviz.render.gradients.grad_horizon` averages it per sequence). The legend sits in
    the corner of the plot that hides the least."""
    heading = title or f"{payload['name']}: gradient norm per time step"
    nonfinite = payload["nonfinite"]
    full_title = _title(heading, payload, step, nonfinite, validation)
    norm = payload["norm"]
    rows, columns = norm.shape
    if columns == 0:
        return paint_message(full_title, "no valid steps")
    probe = cv.Canvas(WIDTH, 1)
    top = cv.title_height(probe, full_title) + 10
    height = math.ceil(top + 290 + X_AXIS + 4)
    canvas = cv.Canvas(WIDTH, height)
    cv.title_block(canvas, full_title)
    width = payload["bin"]
    x = np.arange(columns) * width + (width - 1) / 2
    floor, ceiling = _log_limits(norm)
    crossings = [horizon_crossing(norm[r], x, reverse=r % payload["num_directions"] == 1) for r in range(rows)]
    levels = [HORIZON_FRACTION * float(np.nanmax(np.where(np.isfinite(row) & (row > 0), row, np.nan)))
              for row in norm if (np.isfinite(row) & (row > 0)).any()]
    low = min([floor] + [level / 2 for level in levels])
    shown = _above_resolution(norm)
    lanes = near_zero_lanes(norm, shown)
    tick_labels = [cv.format_log_tick(v) for v in cv.log_ticks(low / 2, ceiling * 2)]
    left = MARGIN + cv.LABEL_SIZE + 6 + cv.tick_room(probe, tick_labels + ["1e-10"][: 0 if tick_labels else 1])
    panel = cv.Panel(canvas, (left, top, WIDTH - MARGIN - 6, height - X_AXIS - 4), (-0.5, columns * width - 0.5),
                     (low / 2, ceiling * 2), ylog=True)
    ticks = _log_axis(panel, low, ceiling)
    entries, drawn = [], []
    for r in range(rows):  # 1 % of each curve's peak: straight dashed lines, sharp at the final size
        colour, _ = row_style(r, payload["num_directions"])
        good = np.isfinite(norm[r]) & (norm[r] > 0)
        if good.any():
            y = float(panel.y(HORIZON_FRACTION * float(norm[r][good].max())))
            canvas.line([(panel.box[0], y), (panel.box[2], y)], cv.palette(colour), width=2, dash=7)
    with canvas.fine(panel.box):
        for r in range(rows):
            colour, style = row_style(r, payload["num_directions"])
            drawn += _log_curve(canvas, panel, x, norm[r], shown[r], floor, cv.palette(colour),
                                dash=cv.DASHES[style] * 1.6, lane=lanes[r])
            entries.append((payload["row_labels"][r], cv.palette(colour), style))
        # where each curve crosses its level: a dot with a white rim
        marks = [(float(panel.x(c[0])), float(panel.y(c[1])), cv.palette(row_style(r, payload["num_directions"])[0]))
                 for r, c in enumerate(crossings) if c is not None]
        if marks:
            canvas.scatter([(np.array([mx]), np.array([my]), (255, 255, 255)) for mx, my, _ in marks], radius=6.5)
            canvas.scatter([(np.array([mx]), np.array([my]), colour) for mx, my, colour in marks], radius=4.5)
    if levels:
        entries.append((HORIZON_LABEL, cv.MUTED_RGB, "h"))
    if (np.isfinite(norm) & ~shown).any():
        entries.append((NEAR_ZERO_LABEL, cv.MUTED_RGB, "v"))
    if nonfinite:
        entries.append((nonfinite, NONFINITE_RGB, "x"))
    panel.frame()
    panel.yticks(ticks, [cv.format_log_tick(v) for v in ticks])
    positions, labels, axis_label = _aligned_time_axis(payload.get("alignment", "start"), columns * width, width,
                                                       _ticks_across(panel.box[2] - panel.box[0]))
    panel.xticks(positions, labels)
    panel.xlabel(axis_label)
    room = panel.box[3] - panel.box[1]
    panel.ylabel(_first_fitting(canvas, ["||dL/dh_t||, mean over sequences", "||dL/dh_t|| (mean)"], cv.LABEL_SIZE,
                                room), offset=cv.tick_room(canvas, [cv.format_log_tick(v) for v in ticks]) + 4)
    size = cv.legend_size(canvas, entries)
    cv.legend(canvas, cv.quiet_corner(panel, size, drawn), entries, column_width=size[0], background=True)
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
    """Gradient norm per step, one line per epoch (colour: epoch, light to dark, the latest darkest and on
    top), one panel per layer/direction; each panel's heading gives the gradient horizon of some of the
    epochs drawn (first and last among them).

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
    ncols = 1 if rows <= 4 else 2  # stacked: each panel as wide as the picture allows
    nrows = math.ceil(rows / ncols)
    probe = cv.Canvas(WIDTH, 1)
    floor, ceiling = _log_limits(*curves.values())
    low, high = epochs[0], epochs[-1]
    vmin, vmax = (low - 0.5, high + 0.5) if low == high else (low, high)
    epoch_ticks = cv.nice_ticks(low, high, 6, integer=True) if high > low else np.array([low])
    epoch_labels = [str(int(e)) for e in epoch_ticks]
    decade_labels = [cv.format_log_tick(v) for v in cv.log_ticks(floor / 2, ceiling * 2)] or ["1e-10"]
    top = cv.title_height(probe, full_title) + 6 + PANEL_HEAD
    bottom = X_AXIS + 4
    zero_note_y = 0.0
    left = MARGIN + cv.LABEL_SIZE + 6 + cv.tick_room(probe, decade_labels)
    right = cv.colour_bar_width(probe, vmin, vmax, epoch_labels) + 2 * MARGIN
    gap_x = cv.tick_room(probe, decade_labels) + GAP
    panel_w = (WIDTH - left - right - gap_x * (ncols - 1)) / ncols
    # two panels side by side leave no room beside a panel's title: the horizons go on a line under it
    below_title = ncols > 1 and any(horizon_entries(horizons, epochs, r) for r in range(rows))
    head = PANEL_HEAD + (cv.TICK_SIZE + 6 if below_title else 0)
    top += head - PANEL_HEAD
    gap_y = head + 8
    panel_h, height = _layout_rows(nrows, top, bottom + cv.TICK_SIZE + 8, 230 if nrows == 1 else 150, gap_y)
    zero_note_y = height - 6
    canvas = cv.Canvas(WIDTH, math.ceil(height))
    cv.title_block(canvas, full_title)
    table = cv.colour_table("epochs")
    time_ticks, time_labels, time_title = _aligned_time_axis(alignment, length, 1, _ticks_across(panel_w))
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
                    canvas.line(np.column_stack((panel.x(run[:, 0]), panel.y(run[:, 1]))), colour,
                                width=DECAY_LINE_PX, round_joints=False)
        panel.frame()
        panel.yticks(ticks, [cv.format_log_tick(v) for v in ticks])
        last = r >= rows - ncols
        panel.xticks(time_ticks, time_labels if last else [""] * len(time_ticks))
        if below_title:
            canvas.text((x0, y0 - 4 - cv.TICK_SIZE - 6), canvas.fit_text(str(layer_labels[r]), cv.PANEL_TITLE_SIZE,
                                                                         panel_w), cv.PANEL_TITLE_SIZE, anchor="ld")
            text = _horizons_within(canvas, horizons, epochs, r, panel_w)
            canvas.text((x0, y0 - 4), text, cv.TICK_SIZE, anchor="ld", fill=cv.MUTED_RGB)
        else:
            room = panel_w - canvas.text_width(str(layer_labels[r]), cv.PANEL_TITLE_SIZE) - 12
            panel.title(str(layer_labels[r]), right=_horizons_within(canvas, horizons, epochs, r, room))
        if column == 0:
            panel.ylabel("||dL/dh_t||", offset=cv.tick_room(canvas, [cv.format_log_tick(v) for v in ticks]) + 4)
        if last:
            panel.xlabel(time_title)
    bar_x = WIDTH - right + MARGIN
    cv.colour_bar(canvas, (bar_x, top, bar_x + cv.BAR_PX, top + nrows * panel_h + (nrows - 1) * gap_y), "epochs",
                  vmin, vmax, "epoch", ticks=epoch_ticks, tick_labels=epoch_labels)
    if any_zero:
        canvas.text((MARGIN, zero_note_y), f"{NEAR_ZERO_LABEL} drawn at {floor:.0e}", cv.TICK_SIZE, anchor="ld",
                    fill=cv.MUTED_RGB)
    return canvas.to_array()


def _horizons_within(canvas: cv.Canvas, horizons: Mapping[int, Sequence[float | None]] | None,
                     epochs: Sequence[int], row: int, room: float) -> str:
    """The horizons of row ``row`` (:func:`~lightning_rnnviz.render.gradients.horizon_text`) of as many
    epochs (4 at most) as fit in ``room`` pixels; ``""`` when not even one does."""
    for most in (4, 3, 2, 1):
        text = horizon_text(horizon_entries(horizons, epochs, row, most=most))
        if canvas.text_width(text, cv.TICK_SIZE) <= room:
            return text
    return ""


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
    ncols = math.ceil(math.sqrt(shown))  # a square-ish grid: 2 x 2 for 4 heads, 3 x 3 for 8
    nrows = math.ceil(shown / ncols)
    query_tokens, key_tokens = payload["query_labels"], payload["key_labels"]
    query_bin, key_bin = payload["query_bin"], payload["key_bin"]
    probe = cv.Canvas(WIDTH, 1)
    top = cv.title_height(probe, full_title) + 6 + PANEL_HEAD
    query_ticks = (common.tick_positions(rows, 99) if query_tokens
                   else cv.nice_ticks(0, max(rows * query_bin - 1, 0), 5, integer=True))
    query_room = (_label_room(probe, query_tokens) if query_tokens
                  else max(probe.text_width(str(int(t)), cv.TICK_SIZE) for t in query_ticks))
    left = MARGIN + cv.LABEL_SIZE + 6 + cv.TICK_PX + 3 + query_room
    bottom = X_AXIS + 4 + (_label_room(probe, key_tokens) - cv.TICK_SIZE + 4 if key_tokens else 0)
    vmax = payload["vmax"]
    right = cv.colour_bar_width(probe, 0.0, vmax) + 2 * MARGIN
    gap_x, gap_y = 10, PANEL_HEAD + 4
    panel = min(300.0, (WIDTH - left - right - gap_x * (ncols - 1)) / ncols)
    panel, height = _layout_rows(nrows, top, bottom, panel, gap_y)
    grid_bottom = top + nrows * panel + (nrows - 1) * gap_y
    label = "attention weight" + (" (sum over key bin)" if key_bin > 1 else "")
    # the colour bar's title reads along the bar: a short grid gets a shorter title
    if probe.text_width(label, cv.LABEL_SIZE) > grid_bottom - top + 30:
        label = "weight" + (" (key bin sum)" if key_bin > 1 else "")
    # A grid narrower than the page (one or two heads) gets a narrower picture, its colour bar beside it.
    width = min(WIDTH, math.ceil(left + ncols * panel + (ncols - 1) * gap_x + right))
    canvas = cv.Canvas(max(width, 440), math.ceil(height))
    cv.title_block(canvas, full_title)
    query_axis, key_axis = axis_titles(payload)
    most = max(3, int(panel / (cv.TICK_SIZE + 6)))
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
                axes.xticks(ticks, [_short(key_tokens[t]) for t in ticks], rotate=True)
            else:
                ticks = cv.nice_ticks(0, max(columns * key_bin - 1, 0), max(2, int(panel / 40)), integer=True)
                axes.xticks(ticks, [str(int(t)) for t in ticks])
        if first_col:
            if query_tokens:
                ticks = common.tick_positions(rows, most)
                axes.yticks(ticks, [_short(query_tokens[t]) for t in ticks])
            else:
                ticks = cv.nice_ticks(0, max(rows * query_bin - 1, 0), max(2, int(panel / 40)), integer=True)
                axes.yticks(ticks, [str(int(t)) for t in ticks])
            axes.ylabel(_bin_label(query_axis, query_bin), offset=cv.TICK_PX + 3 + query_room + 4)
    grid_right = left + ncols * panel + (ncols - 1) * gap_x
    # the key axis's title under the whole grid, at the bottom
    grid = cv.Panel(canvas, (left, top, grid_right, height - cv.LABEL_SIZE - 12), (0.0, 1.0), (0.0, 1.0))
    grid.xlabel(_bin_label(key_axis, key_bin), offset=4)
    bar_x = grid_right + MARGIN + 4
    cv.colour_bar(canvas, (bar_x, top, bar_x + cv.BAR_PX, grid_bottom), "sequential", 0.0, vmax, label)
    _nonfinite_key(canvas, nonfinite, height - 4)
    return canvas.to_array()


PAINTERS = {
    "hidden": paint_hidden,
    "gates": paint_gates,
    "grad_norm": paint_grad_norm,
    "attention": paint_attention,
}
