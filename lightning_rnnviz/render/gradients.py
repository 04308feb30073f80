"""Gradient norms ``||dL/dh_t||`` over time: one recording, its decay statistics, and epochs compared.

A log axis cannot show zero, and float32 cannot tell a value below about ``1e-7`` of its curve's peak from
rounding (:data:`RESOLUTION`): such values, zeros included, are drawn as triangles on a floor one decade below
the smallest value above that resolution, and the legend says so. The axis spans what is drawn above it, not
the dozens of decades down to a vanished step. Non-finite values are drawn as crosses along the top edge.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import offset_copy

from lightning_rnnviz.render import common
from lightning_rnnviz.render._lazy import torch

if TYPE_CHECKING:
    from lightning_rnnviz.probe.records import RNNRecord

_NONFINITE_COLOR = "red"
RESOLUTION = 1e-7
"""A value of ``||dL/dh_t||`` below this fraction of its curve's largest value is drawn as (near) zero: float32
keeps about 7 significant digits (``eps`` = 1.2e-7), so such a value is at the level of the rounding of sums
of terms as large as the peak, and the weight update that sums the curve's steps cannot feel it."""
NEAR_ZERO_LABEL = "~0 (< 1e-7 x peak)"
LANE_PX = 8
"""Pixels between the floor's rows of triangles of different curves, so that one does not hide another."""
# Bidirectional modules: colour tells the direction, line style the layer.
LAYER_STYLES = ("-", "--", ":", "-.")
HORIZON_FRACTION = 0.01
PEAK_LABEL = "1% of peak"  # the grad_norm picture's dashed lines: HORIZON_FRACTION of each curve's peak


def row_style(row: int, num_directions: int) -> tuple[int, str]:
    """``(colour index, line style)`` of row ``row`` of a gradient-norm picture: one colour per layer, solid,
    for a one-directional module; one colour per direction (forward first) and one line style per layer
    (:data:`LAYER_STYLES`, in turn) for a bidirectional one."""
    layer, direction = divmod(row, num_directions)
    if num_directions == 1:
        return layer, "-"
    return direction, LAYER_STYLES[layer % len(LAYER_STYLES)]


def reduce_grad_norm(record: RNNRecord, max_time: int = 2048) -> dict[str, Any] | None:
    """Cut :attr:`RNNRecord.grad_norm` to the steps where some sequence is valid.

    Args:
        record: the recorded module.
        max_time: most time points per curve (longer sequences are averaged in bins).

    Returns:
        ``None`` when ``record.hidden_grad`` is ``None`` (no backward reached the module); else a small
        picklable dict with ``norm`` ``(layers*directions, columns)``.

    Raises:
        ValueError: ``max_time`` not positive.
    """
    max_time = common.check_positive("max_time", max_time)
    norms = record.grad_norm
    if norms is None:
        return None
    horizon = int(record.lengths.max()) if record.lengths.numel() else 0
    values = norms[:, :horizon].double().numpy()
    binned, width = common.bin_axis(values, max_time)
    header = common.record_header(record)
    alignment = record.grad_alignment
    if alignment == "end":
        header["context"] = (*header["context"], "sequences lined up at their last steps, where the gradient "
                                                 "enters each alike")
    starts = getattr(record, "call_starts", None)
    if starts is not None:
        # where each later call of a chain begins, on the time axis the curve averages over
        for index, row in enumerate(starts[1:], start=2):
            tail = (record.lengths.cpu() - row).tolist()
            row = row.tolist()
            if alignment == "end" and min(tail) == max(tail):
                where = f"is each sequence's last {tail[0]} steps"
            elif min(row) == max(row):
                where = f"begins at step {row[0]}"
            else:
                where = f"begins at steps {min(row)}-{max(row)}, by sequence (each counted from its own first step)"
            header["context"] = (*header["context"], f"call {index} {where}")
    return {
        **header,
        "alignment": alignment,
        "norm": binned.astype(np.float64),
        "bin": width,
        "num_directions": record.num_directions,
        "row_labels": [record.layer_label(i) for i in range(values.shape[0])],
        "nonfinite": common.nonfinite_flag(values),
    }


def draw_grad_norm(payload: dict[str, Any], *, step: int | None = None, title: str | None = None,
                   validation: bool = False) -> Figure:
    """``||dL/dh_t||_2`` (mean over valid sequences) against ``t``, log axis, one line per layer/direction.

    Colour tells the layer; in a bidirectional module it tells the direction and the line style the layer
    (:func:`row_style`). The axis spans the values above :data:`RESOLUTION` of their curve's peak; those
    below, zeros included, are triangles on its floor. A dashed line in each curve's colour marks 1 % of its
    peak (:data:`HORIZON_FRACTION`), and a dot where the curve, followed back from where its direction ends,
    first falls below it (:func:`horizon_crossing`): the horizon of the drawn curve (:func:`grad_horizon`
    averages it per sequence).

    Args:
        payload: from :func:`reduce_grad_norm`.
        step: training step for the title (``train step <n>``).
        title: replaces the heading ``"<module>: gradient norm per time step"``.
        validation: the picture shows the validation sample (``validation at train step <n>``).
    """
    heading = title or f"{payload['name']}: gradient norm per time step"
    full_title = common.compose_title(heading, payload, step, payload["nonfinite"], width=1000,
                                      validation=validation)
    norm = payload["norm"]
    rows, columns = norm.shape
    if columns == 0:
        return common.message_figure(full_title, "no valid steps")
    top = common.top_margin(full_title, 0.12)
    fig = common.new_figure(common.FIGURE_WIDTH, top + 0.5 + 2.4)
    grid = common.panel_grid(fig, 1, 1, top=top, bottom=0.5, left=0.62, right=0.15)
    ax = fig.add_subplot(grid[0, 0])
    ax.set_yscale("log")
    width = payload["bin"]
    x = np.arange(columns) * width + (width - 1) / 2
    floor, ceiling = _log_limits(norm)
    shown = _above_resolution(norm)
    lanes = near_zero_lanes(norm, shown)
    handles = []
    low = floor / 2
    for r in range(rows):
        colour, linestyle = row_style(r, payload["num_directions"])
        style = {"color": f"C{colour % 10}", "linestyle": linestyle}
        handles.append(_plot_log_curve(ax, x, norm[r], shown[r], floor, style, lanes[r]))
        handles[-1].set_label(payload["row_labels"][r])
        good = np.isfinite(norm[r]) & (norm[r] > 0)
        if good.any():  # 1 % of the curve's peak, and where the curve falls below it going back
            level = HORIZON_FRACTION * float(norm[r][good].max())
            low = min(low, level / 3)
            ax.axhline(level, color=style["color"], linestyle="--", linewidth=1.2, zorder=1.5)
            crossing = horizon_crossing(norm[r], x, reverse=r % payload["num_directions"] == 1)
            if crossing is not None:
                ax.plot(*crossing, marker="o", markersize=6, color=style["color"], markeredgecolor="white",
                        markeredgewidth=1.2, linestyle="", zorder=3)
    if (np.isfinite(norm) & ~shown).any():
        handles.append(_zero_handle())
    if payload["nonfinite"]:
        handles.append(
            Line2D([], [], color=_NONFINITE_COLOR, marker="x", linestyle="", label=payload["nonfinite"])
        )
    if (np.isfinite(norm) & (norm > 0)).any():
        handles.append(Line2D([], [], color="0.4", linestyle="--", linewidth=1.2, marker="o", markersize=5,
                              markeredgecolor="white", label=PEAK_LABEL))
    ax.set_xlim(-0.5, columns * width - 0.5)
    ax.set_ylim(low, ceiling * 2)
    log_ticks(ax)
    ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
    ax.tick_params(labelsize=common.TICK_SIZE, length=2.5, pad=1.5)
    ax.grid(True, which="major", color="0.9", linewidth=0.6)
    label = "time step" if width == 1 else f"time (bins of {width} steps)"
    if payload.get("alignment") == "end":
        # 0 at each sequence's last step, negative before it
        last = columns * width - 1
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v - last))}"))
        label = "steps before each sequence's end" + ("" if width == 1 else f" (bins of {width})")
    ax.set_xlabel(label, fontsize=common.LABEL_SIZE, labelpad=2)
    ax.set_ylabel("||dL/dh_t||", fontsize=common.LABEL_SIZE, labelpad=2)
    ax.legend(handles=handles, loc="best", fontsize=common.TICK_SIZE, framealpha=0.85, handlelength=1.8,
              borderaxespad=0.3, borderpad=0.3, labelspacing=0.25, handletextpad=0.5)
    common.card_title(fig, full_title)
    return fig


def horizon_crossing(values: np.ndarray, x: np.ndarray, reverse: bool,
                     fraction: float = HORIZON_FRACTION) -> tuple[float, float] | None:
    """``(x, level)`` where a curve of ``values`` at ``x``, followed back from where its direction ends (its
    last column; its first when ``reverse``), first falls below ``level`` = ``fraction`` of its largest
    finite value, interpolated on the log scale between the last column at or above it and the first below;
    ``None`` when it never does or has no positive value. Non-finite columns are passed over."""
    good = np.isfinite(values) & (values > 0)
    if not good.any():
        return None
    level = fraction * float(values[good].max())
    before = None  # the last column at or above the level
    for index in range(len(values)) if reverse else range(len(values) - 1, -1, -1):
        value = values[index]
        if not np.isfinite(value):
            continue
        if value >= level:
            before = index
            continue
        if before is None:
            return float(x[index]), level
        high, low = math.log10(values[before]), math.log10(max(value, level * 1e-12))
        share = (high - math.log10(level)) / (high - low)
        return float(x[before] + share * (x[index] - x[before])), level
    return None


def log_ticks(ax: Any) -> None:
    """Decade ticks on ``ax``'s log y axis, at most five labelled, written plainly (``0.01``, ``1``,
    ``1e-7``); no labels on the minor ticks."""
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=5))
    ax.yaxis.set_major_formatter(FuncFormatter(_decade))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _decade(value: float, _: Any = None) -> str:
    if value <= 0:
        return ""
    exponent = round(math.log10(value))
    if not math.isclose(value, 10.0**exponent, rel_tol=1e-6):
        return ""
    return f"{10.0 ** exponent:g}" if -2 <= exponent <= 3 else f"1e{exponent}"




def sequence_grad_norms(record: RNNRecord) -> torch.Tensor | None:
    """``(layers*directions, batch, time)``: ``||dL/dh_t||_2`` of every recorded sequence (zero past its end);
    ``None`` without gradient. Computed once per record, where it lives; the result is on the CPU."""
    if record.hidden_grad is None:
        return None
    cached = record.derived.get("sequence_grad_norms")
    if cached is None or cached[0] is not record.hidden_grad:
        norms = torch.linalg.vector_norm(record.hidden_grad.float(), dim=-1).cpu().double()
        cached = record.derived["sequence_grad_norms"] = (record.hidden_grad, norms)
    return cached[1]


def grad_horizon(record: RNNRecord, fraction: float = HORIZON_FRACTION) -> torch.Tensor | None:
    """The gradient horizon of each row: ``(layers*directions,)`` float64 steps, ``None`` without gradient.

    For one sequence and row, count the steps back from the last one the direction processes (the
    sequence's last valid step going forward, ``t = 0`` in reverse) over which ``||dL/dh_t||`` stays at or
    above ``fraction`` of its largest value over that sequence; the first step below ends the count. The
    horizon is the mean of this count over the recorded sequences (each counted from its own end, so
    padding does not matter). It is the distance over which the module can still learn, in steps: a
    many-to-one loss on a vanilla RNN gives a few steps, a healthy LSTM the whole sequence; a loss on
    every step gives every step a direct gradient, so the horizon is then the sequence length. Sequences
    without a positive finite peak (no gradient, NaN/Inf) are left out; NaN when none is left.

    Example::

        >>> import torch
        >>> from lightning_rnnviz.probe.records import RNNRecord
        >>> grad = torch.zeros(1, 2, 5, 1)
        >>> grad[0, 0, :, 0] = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1, 1.0])  # 1 % of the peak 2 steps back: 3 steps
        >>> grad[0, 1, :3, 0] = torch.tensor([0.5, 0.5, 1.0])               # length 3: every step counts
        >>> rec = RNNRecord("rnn", "RNN_TANH", torch.zeros(1, 2, 5, 1), {}, grad, None, None, torch.tensor([5, 3]))
        >>> grad_horizon(rec).tolist()  # (3 + 3) / 2
        [3.0]
    """
    counts = sequence_horizons(record, fraction)
    if counts is None:
        return None
    out = torch.full((counts.shape[0],), float("nan"), dtype=torch.float64)
    for r, row in enumerate(counts):
        usable = row.isfinite()
        if bool(usable.any()):
            out[r] = row[usable].mean()
    return out


def sequence_horizons(record: RNNRecord, fraction: float = HORIZON_FRACTION) -> torch.Tensor | None:
    """``(layers*directions, batch)`` float64: each sequence's count of :func:`grad_horizon` (the steps back
    from the last one its direction processes over which ``||dL/dh_t||`` stays at or above ``fraction`` of
    the sequence's peak; the sequence's length where it never falls below), NaN for a sequence left out
    (no positive finite peak, NaN/Inf, no valid step); ``None`` without gradient. The first step below is
    ``length - 1 - count`` for a forward row, ``count`` for a reverse one."""
    norms = sequence_grad_norms(record)
    if norms is None:
        return None
    rows, batch, steps = norms.shape
    lengths = record.lengths.cpu().to(torch.int64)
    t = torch.arange(steps)
    valid = t.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    forward = (lengths.unsqueeze(1) - 1 - t.unsqueeze(0)).double()  # distance back from the last step
    reverse = t.unsqueeze(0).expand(batch, steps).double()
    out = torch.full((rows, batch), float("nan"), dtype=torch.float64)
    for r in range(rows):
        distance = reverse if r % record.num_directions == 1 else forward
        n = norms[r]
        finite = torch.where(valid, n.isfinite(), True).all(-1)
        peak = torch.where(valid, n, 0.0).amax(-1)  # (B,)
        below = valid & (n < fraction * (1 - 1e-6) * peak.unsqueeze(-1))  # 1e-6: float32's 0.01 is not below 1 %
        count = torch.where(below, distance, lengths.unsqueeze(1).double()).amin(-1)
        usable = finite & (peak > 0) & (lengths > 0)
        out[r] = torch.where(usable, count, float("nan"))
    return out


def grad_stats(record: RNNRecord) -> dict[str, float]:
    """How the gradient norm changes along each row's processing order.

    Forward rows process ``t = 0 .. last`` (``last`` = the last step any sequence reaches), reverse rows
    ``t = last .. 0``; the gradient flows backwards, from the last processed step to the first.

    - ``first_norm`` / ``last_norm``: :attr:`RNNRecord.grad_norm` at the first / last processed step.
    - ``log10_ratio``: ``log10(first_norm / last_norm)``; negative when the gradient vanishes going back.
    - ``decay_per_step``: least-squares slope of ``log10`` norm against the distance in steps from the last
      processed step, over finite positive points (NaN with fewer than two); negative when vanishing,
      positive when exploding.
    - ``horizon``: :func:`grad_horizon`, the steps back over which the norm stays at or above 1 % of its
      largest value.

    Empty when the record has no gradient. Names carry :func:`~lightning_rnnviz.render.common.row_suffix`.

    Example::

        >>> import torch
        >>> from lightning_rnnviz.probe.records import RNNRecord
        >>> grad = torch.zeros(1, 1, 4, 2)
        >>> grad[0, 0, :, 0] = torch.tensor([1e-3, 1e-2, 1e-1, 1.0])  # ten times smaller per step back
        >>> h = torch.zeros(1, 1, 4, 2)
        >>> rec = RNNRecord("rnn", "RNN_TANH", h, {}, grad, None, None, torch.tensor([4]))
        >>> {k: round(v, 6) for k, v in grad_stats(rec).items()}
        {'first_norm': 0.001, 'last_norm': 1.0, 'log10_ratio': -3.0, 'decay_per_step': -1.0, 'horizon': 3.0}
    """
    norms = record.grad_norm
    if norms is None:
        return {}
    horizon = int(record.lengths.max()) if record.lengths.numel() else 0
    norms = norms[:, :horizon].double()
    horizons = grad_horizon(record)
    stats: dict[str, float] = {}
    for r in range(norms.shape[0]):
        suffix = common.row_suffix(record, r)
        ordered = norms[r].flip(0) if r % record.num_directions == 1 else norms[r]  # processing order
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        first = ordered[0] if horizon else nan
        last = ordered[-1] if horizon else nan
        stats["first_norm" + suffix] = float(first)
        stats["last_norm" + suffix] = float(last)
        stats["log10_ratio" + suffix] = float(torch.log10(first) - torch.log10(last))
        stats["decay_per_step" + suffix] = _log_slope(ordered)
        stats["horizon" + suffix] = float(horizons[r])
    return stats


def _log_slope(ordered: torch.Tensor) -> float:
    """Least-squares slope of ``log10(ordered)`` against the distance from the last element."""
    distance = torch.arange(ordered.numel() - 1, -1, -1, dtype=torch.float64)
    keep = ordered.isfinite() & (ordered > 0)
    if int(keep.sum()) < 2:
        return float("nan")
    x, y = distance[keep], torch.log10(ordered[keep])
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def draw_grad_decay(
    history: Mapping[int, np.ndarray | torch.Tensor],
    name: str,
    layer_labels: Sequence[str],
    *,
    step: int | None = None,
    title: str | None = None,
    max_curves: int = 16,
    horizons: Mapping[int, Sequence[float | None]] | None = None,
    notes: Sequence[str] = (),
    alignment: str = "start",
) -> Figure:
    """Gradient norm per step, one line per epoch, one panel per layer/direction; each panel's heading gives
    the gradient horizon of some of the epochs drawn. ``alignment`` ``"end"``: the curves are lined up at
    each sequence's last step (:attr:`RNNRecord.grad_alignment`), so they end together, counted back.

    Args:
        history: epoch -> ``(layers*directions, time)`` gradient norms (e.g. ``RNNRecord.grad_norm`` of a
            fixed batch); curves may differ in length, NaN marks missing steps.
        name: the module's name, for the title.
        layer_labels: one label per row, e.g. ``[record.layer_label(i) for i in range(rows)]``.
        step: training step for the title (``train step <n>``).
        title: replaces the heading ``"<name>: gradient norm per time step, by epoch"``.
        max_curves: most epochs drawn; beyond that, evenly spaced epochs (first and last included).
        horizons: epoch -> per-row gradient horizon (:func:`grad_horizon`, averaged over the epoch), for
            the panels' headings; ``None`` gives none.
        notes: approximation notes of the recordings behind the curves; the title says "approximate".

    Raises:
        ValueError: empty ``history``, or an entry that is not ``(len(layer_labels), time)``.
    """
    epochs, curves, total, flag = decay_curves(history, layer_labels, max_curves, alignment)
    rows = len(layer_labels)
    payload = {"exact": not notes, "notes": tuple(notes)}
    heading = title or f"{name}: gradient norm per time step, by epoch"
    if len(epochs) < total:
        heading += f" ({len(epochs)} of {total} epochs)"
    full_title = common.compose_title(heading, payload, step, flag, width=1000)
    length = max(v.shape[1] for v in curves.values())
    if length == 0:
        return common.message_figure(full_title, "no steps recorded")

    ncols = 1 if rows <= 4 else 2
    nrows = math.ceil(rows / ncols)
    top = common.top_margin(full_title, 0.24)
    floor, ceiling = _log_limits(*curves.values())
    any_zero = any(bool((np.isfinite(v) & ~_above_resolution(v)).any()) for v in curves.values())
    bottom = 0.5 + (0.2 if any_zero else 0.0)
    left, hspace, wspace = 0.62, 0.3, 0.55
    panel_h = 1.9 if nrows == 1 else 1.2 if nrows == 2 else 0.85
    fig = common.new_figure(common.FIGURE_WIDTH, top + bottom + panel_h * nrows + hspace * (nrows - 1))
    grid = common.panel_grid(fig, nrows, ncols, top=top, bottom=bottom, left=left, right=common.COLORBAR_MARGIN,
                             hspace=hspace, wspace=wspace)
    panel_w = (common.FIGURE_WIDTH - left - common.COLORBAR_MARGIN - wspace * (ncols - 1)) / ncols
    low, high = epochs[0], epochs[-1]
    norm = Normalize(low - 0.5, high + 0.5) if low == high else Normalize(low, high)
    mappable = ScalarMappable(norm=norm, cmap=epoch_colormap())
    for r in range(rows):
        ax = fig.add_subplot(grid[divmod(r, ncols)])
        ax.set_yscale("log")
        segments, colors = [], []
        for epoch in epochs:  # the latest epoch drawn last, on top
            values = curves[epoch][r]
            near_zero = np.isfinite(values) & ~_above_resolution(values)
            for run in _finite_runs(np.where(near_zero, floor, values)):
                segments.append(run)
                colors.append(mappable.to_rgba(epoch))
        # past a few curves antialiasing adds little to the dense band but triples the PNG size
        lines = LineCollection(segments, colors=colors, linewidths=common.LINE_WIDTH, antialiaseds=len(epochs) <= 6,
                               capstyle="round")
        ax.add_collection(lines)
        ax.set_xlim(-0.5, length - 0.5)
        ax.set_ylim(floor / 2, ceiling * 2)
        log_ticks(ax)
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=4 if panel_h < 1 else 5))
        ax.xaxis.set_major_locator(MaxNLocator(6 if ncols == 1 else 4, integer=True))
        if alignment == "end":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v - (length - 1)))}"))
        ax.tick_params(labelsize=common.TICK_SIZE, length=2.5, pad=1.5)
        ax.grid(True, which="major", color="0.9", linewidth=0.6)
        label = common.escape_text(str(layer_labels[r]))
        ax.set_title(label, fontsize=common.PANEL_TITLE_SIZE, loc="left", y=1.0, pad=3)
        room = panel_w - common.text_width(label, common.PANEL_TITLE_SIZE) - 0.15
        text = ""
        for most in (4, 3, 2, 1):
            text = horizon_text(horizon_entries(horizons, epochs, r, most=most))
            if common.text_width(text, common.TICK_SIZE) <= room:
                break
        if text:
            ax.set_title(common.escape_text(text), fontsize=common.TICK_SIZE, loc="right", y=1.0, pad=3,
                         color="0.25")
        if r % ncols == 0:
            ax.set_ylabel("||dL/dh_t||", fontsize=common.LABEL_SIZE, labelpad=2)
        if r >= rows - ncols:
            ax.set_xlabel("steps before each sequence's end" if alignment == "end" else "time step",
                          fontsize=common.LABEL_SIZE, labelpad=2)
        else:
            ax.tick_params(axis="x", labelbottom=False)
    width, height = fig.get_size_inches()
    cax = fig.add_axes(((width - common.COLORBAR_MARGIN + 0.12) / width, bottom / height, 0.11 / width,
                        1 - (bottom + top) / height))
    colorbar = fig.colorbar(mappable, cax=cax)
    colorbar.set_label("epoch", fontsize=common.LABEL_SIZE, labelpad=2)
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
    colorbar.ax.tick_params(labelsize=common.TICK_SIZE, length=2.5, pad=1.5)
    if any_zero:
        fig.text(0.04 / width, 0.04 / height, f"{NEAR_ZERO_LABEL} drawn at {floor:.0e}", fontsize=common.TICK_SIZE,
                 color="0.3", va="bottom")
    common.card_title(fig, full_title)
    return fig


@functools.cache
def epoch_colormap() -> Colormap:
    """The colours of the epochs of a ``grad_decay`` picture: from a light orange (the first) through red
    to a dark violet (the latest, darkest), each still clear on white."""
    return LinearSegmentedColormap.from_list("rnnviz_epochs", matplotlib.colormaps["inferno_r"](np.linspace(0.2, 0.9, 64)))


def horizon_entries(horizons: Mapping[int, Sequence[float | None]] | None, epochs: Sequence[int], row: int,
                    most: int = 4) -> list[tuple[int, float]]:
    """``(epoch, horizon)`` for the legend of row ``row``: at most ``most`` of the ``epochs`` drawn that have
    a finite horizon, evenly spaced, the first and the last included."""
    known = [(e, horizons[e][row]) for e in epochs
             if horizons and e in horizons and row < len(horizons[e]) and horizons[e][row] is not None
             and math.isfinite(horizons[e][row])]
    if len(known) > most:
        picks = np.unique(np.linspace(0, len(known) - 1, most).round().astype(np.int64))
        known = [known[i] for i in picks]
    return [(e, float(h)) for e, h in known]


def horizon_text(entries: Sequence[tuple[int, float]]) -> str:
    """The right-hand heading of a ``grad_decay`` panel: each listed epoch's horizon in steps, e.g.
    ``"horizon: e0 15, e3 30, e9 30"``."""
    if not entries:
        return ""
    return "horizon: " + ", ".join(f"e{e} {h:.0f}" for e, h in entries)


def decay_curves(
    history: Mapping[int, np.ndarray | torch.Tensor], layer_labels: Sequence[str], max_curves: int = 16,
    alignment: str = "start",
) -> tuple[list[int], dict[int, np.ndarray], int, str]:
    """Check and thin a :func:`draw_grad_decay` history: ``(epochs drawn, epoch -> float64 curves,
    epochs in the history, non-finite flag)``; with ``alignment`` ``"end"`` the shorter curves are padded
    with NaN in front, so that every curve ends at the last column."""
    if not history:
        raise ValueError("`history` is empty; pass at least one epoch -> (layers*directions, time) array.")
    max_curves = common.check_positive("max_curves", max_curves)
    rows = len(layer_labels)
    epochs = sorted(history)
    total = len(epochs)
    if total > max_curves:
        picks = np.unique(np.linspace(0, total - 1, max_curves).round().astype(np.int64))
        epochs = [epochs[i] for i in picks]
    curves = {}
    for epoch in epochs:
        values = history[epoch]
        if hasattr(values, "detach"):  # a tensor; a drawing process sees numpy only
            values = values.detach().cpu().double().numpy()
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] != rows:
            raise ValueError(
                f"`history[{epoch}]` has shape {values.shape}; "
                f"expected ({rows}, time) to match `layer_labels`."
            )
        curves[epoch] = values
    flag = common.nonfinite_flag(*(_strip_trailing_nan(v) for v in curves.values()))
    if alignment == "end" and curves:
        longest = max(v.shape[1] for v in curves.values())
        curves = {e: np.pad(v, ((0, 0), (longest - v.shape[1], 0)), constant_values=np.nan)
                  for e, v in curves.items()}
    return epochs, curves, total, flag


def _above_resolution(values: np.ndarray) -> np.ndarray:
    """Where ``values`` (curves along the last axis) are finite and at least :data:`RESOLUTION` of their own
    curve's largest finite value: what a log axis draws as a line; zero is never above."""
    finite = np.isfinite(values)
    peak = np.where(finite, values, 0.0).max(axis=-1, initial=0.0, keepdims=True)
    return finite & (values > 0) & (values >= RESOLUTION * peak)


def _log_limits(*curves: np.ndarray) -> tuple[float, float]:
    """``(floor, ceiling)`` of a log axis for ``curves`` (each along its last axis): a decade below the
    smallest value above :data:`RESOLUTION` of its curve's peak (where the rest is drawn); the largest."""
    shown = np.concatenate([np.asarray(c)[_above_resolution(np.asarray(c))].ravel() for c in curves] or [[]])
    if shown.size == 0:
        return 0.1, 10.0
    low, high = float(shown.min()), float(shown.max())
    return low / 10, high


def near_zero_lanes(values: np.ndarray, shown: np.ndarray) -> list[int]:
    """For each curve (row) of ``values``, which row of triangles on the floor its values that are not
    ``shown`` (zero, or below the resolution) take, counted upwards, :data:`LANE_PX` apart: curves with
    such values in turn; ``0`` for the others."""
    lanes, lane = [], 0
    for row, keep in zip(values, shown):
        hidden = bool((np.isfinite(row) & ~keep).any())
        lanes.append(lane if hidden else 0)
        lane += hidden
    return lanes


def _lone_points(shown: np.ndarray) -> np.ndarray:
    """Where a ``shown`` value has no shown neighbour: a line through it draws nothing."""
    before = np.concatenate(([False], shown[:-1]))
    after = np.concatenate((shown[1:], [False]))
    return shown & ~before & ~after


def _plot_log_curve(
    ax: Any, x: np.ndarray, values: np.ndarray, shown: np.ndarray, floor: float, style: dict[str, Any],
    lane: int = 0,
) -> Line2D:
    """A curve through the ``shown`` values (a lone one as a dot); the other finite ones (zero, or below the
    resolution) as triangles on ``floor``, ``lane`` rows up; non-finite ones as crosses along the top."""
    (line,) = ax.plot(x, np.where(shown, values, np.nan), linewidth=1.3, **style)
    lone = _lone_points(shown)
    if lone.any():
        ax.plot(x[lone], values[lone], marker="o", linestyle="", color=style["color"], markersize=3.5)
    near_zero = np.isfinite(values) & ~shown
    if near_zero.any():
        up = offset_copy(ax.transData, fig=ax.figure, y=lane * LANE_PX * 72 / ax.figure.dpi, units="points")
        ax.plot(
            x[near_zero],
            np.full(int(near_zero.sum()), floor),
            marker="v",
            linestyle="",
            color=style["color"],
            markersize=4,
            transform=up,
        )
    bad = ~np.isfinite(values)
    if bad.any():
        ax.plot(
            x[bad],
            np.full(int(bad.sum()), 0.97),
            marker="x",
            linestyle="",
            color=_NONFINITE_COLOR,
            transform=ax.get_xaxis_transform(),
        )
    return line


def _zero_handle() -> Line2D:
    return Line2D([], [], color="0.3", marker="v", linestyle="", markersize=4, label=NEAR_ZERO_LABEL)


def _finite_runs(values: np.ndarray) -> list[np.ndarray]:
    """``(n, 2)`` point arrays of each run of consecutive finite positive values (single points dropped)."""
    good = np.isfinite(values) & (values > 0)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], good.astype(np.int8), [0]))))
    runs = []
    for start, stop in zip(edges[::2], edges[1::2]):
        if stop - start >= 2:
            t = np.arange(start, stop)
            runs.append(np.column_stack((t, values[start:stop])))
    return runs


def _strip_trailing_nan(values: np.ndarray) -> np.ndarray:
    """Drop the NaN padding at the end of each curve so that only real NaN count as a warning."""
    filled = ~np.isnan(values)
    keep = filled.any(0)
    end = int(np.flatnonzero(keep)[-1]) + 1 if keep.any() else 0
    return values[:, :end]
