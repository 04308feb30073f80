"""Gate activations: mean over time per gate, and how many units each gate keeps closed or open (after the
per-unit saturation of Karpathy et al., 2015).

A gate value is *left-saturated* when it lies within 0.1 of its lower bound and *right-saturated* when it
lies within 0.1 of its upper bound: ``< 0.1`` / ``> 0.9`` for sigmoid gates (LSTM input, forget, output;
GRU reset, update), ``< -0.9`` / ``> 0.9`` for the tanh candidates (LSTM ``cell``, GRU ``new``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_rnnviz.render import common
from lightning_rnnviz.render._lazy import torch

if TYPE_CHECKING:
    from lightning_rnnviz.probe.records import RNNRecord

SATURATION_MARGIN = 0.1
TANH_GATES = frozenset({"cell", "new"})
_GATE_COLORS = {
    "input": "tab:blue",
    "forget": "tab:orange",
    "cell": "tab:green",
    "output": "tab:red",
    "reset": "tab:purple",
    "update": "tab:brown",
    "new": "tab:cyan",
}


def gate_bounds(gate: str) -> tuple[float, float]:
    """``(low, high)`` thresholds below/above which ``gate`` counts as left/right-saturated."""
    if gate in TANH_GATES:
        return -1.0 + SATURATION_MARGIN, 1.0 - SATURATION_MARGIN
    return SATURATION_MARGIN, 1.0 - SATURATION_MARGIN


SATURATED_MOST = 0.5  # a unit counts as closed (open) when its gate is left- (right-) saturated on more valid steps


def saturation_shares(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The share of units that are *closed* (left-saturated on most valid steps, ``low > 0.5``) and *open*
    (right-saturated on most, ``high > 0.5``), along the last axis of the per-unit fractions ``low`` and
    ``high`` (:func:`reduce_gates`); a unit is never both."""
    count = max(low.shape[-1], 1)
    return (low > SATURATED_MOST).sum(-1) / count, (high > SATURATED_MOST).sum(-1) / count


def reduce_gates(record: RNNRecord, max_time: int = 256, max_units: int = 512) -> dict[str, Any] | None:
    """Cut what :func:`draw_gates` needs out of ``record``, over the whole batch and its valid steps.

    Args:
        record: the recorded module.
        max_time: most time points of the mean curves (longer sequences are averaged in bins).
        max_units: most units per gate in the saturation shares (evenly spaced unit indices beyond that).

    Returns:
        ``None`` for a module without gates (vanilla RNN); else a small picklable dict with ``mean``
        ``(layers*directions, gates, columns)`` and ``low``/``high`` ``(layers*directions, gates, units)``
        saturation fractions.

    Raises:
        ValueError: ``max_time`` or ``max_units`` not positive.
    """
    max_time = common.check_positive("max_time", max_time)
    max_units = common.check_positive("max_units", max_units)
    if not record.gates:
        return None
    names = tuple(record.gates)
    summary = gate_summary(record)
    valid = record.valid_mask("cpu")  # (B, T)
    horizon = int(record.lengths.max()) if record.lengths.numel() else 0
    count = valid.sum(0)[:horizon].double()  # (L,)
    steps = float(valid.sum())
    size = record.gates[names[0]].shape[-1]
    units = (
        torch.from_numpy(np.unique(np.linspace(0, size - 1, max_units).round().astype(np.int64)))
        if size > max_units else None
    )
    means = np.stack([(summary[g]["curve"][:, :horizon] / count).numpy() for g in names], axis=1)
    low = torch.stack([summary[g]["low"] for g in names], dim=1) / steps  # (LD, G, U)
    high = torch.stack([summary[g]["high"] for g in names], dim=1) / steps
    if units is not None:
        low, high = low[..., units], high[..., units]
    low, high = low.numpy(), high.numpy()
    flags = " ".join(summary[g]["nonfinite"] for g in names)
    rows = record.hidden.shape[0]
    binned, width = common.bin_axis(means, max_time)
    return {
        **common.record_header(record),
        "gates": names,
        "mean": binned.astype(np.float32),
        "bin": width,
        "low": low.astype(np.float32),
        "high": high.astype(np.float32),
        "units_shown": int(low.shape[-1]),
        "hidden_size": int(size),
        "row_labels": [record.layer_label(i) for i in range(rows)],
        "nonfinite": " and ".join(word for word in ("NaN", "Inf") if word in flags),
    }


def draw_gates(payload: dict[str, Any], *, step: int | None = None, title: str | None = None,
               validation: bool = False) -> Figure:
    """Left: mean activation of each gate over time; right: how many units each gate keeps closed or open.

    One row of panels per layer/direction. On the right, one bar per gate splits the units into those
    left-saturated on most (more than half) of the valid steps ("closed"; near -1 for a tanh candidate),
    those right-saturated on most ("open"; near +1) and the rest, in percent of the units shown; the gate's
    name beside its bar, in its curve's colour, is the legend of the curves.

    Args:
        payload: from :func:`reduce_gates`.
        step: training step for the title (``train step <n>``).
        title: replaces the heading ``"<module>: gate activations"``.
        validation: the picture shows the validation sample (``validation at train step <n>``).
    """
    heading = title or f"{payload['name']}: gate activations"
    full_title = common.compose_title(heading, payload, step, payload["nonfinite"], width=1000,
                                      validation=validation)
    mean = payload["mean"]
    rows, _, columns = mean.shape
    if columns == 0:
        return common.message_figure(full_title, "no valid steps")
    names = payload["gates"]
    labels = [gate + (" (tanh)" if gate in TANH_GATES else "") for gate in names]
    colors = [_GATE_COLORS.get(gate, f"C{g}") for g, gate in enumerate(names)]
    top = common.top_margin(full_title, 0.24)
    bottom = 0.5
    panel_h = max(0.85, 0.19 * len(names) + 0.1)
    hspace = 0.3
    fig = common.new_figure(common.FIGURE_WIDTH, top + bottom + panel_h * rows + hspace * (rows - 1))
    left, right, bars_w = 0.5, 0.2, 1.0
    gap = 0.12 + max(common.text_width(label, common.TICK_SIZE) for label in labels)
    curves_w = common.FIGURE_WIDTH - left - right - gap - bars_w
    grid = common.panel_grid(fig, rows, 2, top=top, bottom=bottom, left=left, right=right, hspace=hspace,
                             wspace=gap, width_ratios=(curves_w, bars_w))
    width = payload["bin"]
    x = np.arange(columns) * width + (width - 1) / 2
    has_tanh = any(gate in TANH_GATES for gate in names)
    y_range = (-1.08, 1.08) if has_tanh else (-0.04, 1.04)
    shown = payload["units_shown"]
    units = f"{shown} units" if shown == payload["hidden_size"] else f"{shown} of {payload['hidden_size']} units"
    closed, opened = (100 * share for share in saturation_shares(payload["low"], payload["high"]))  # (rows, gates)
    for r in range(rows):
        curves = fig.add_subplot(grid[r, 0])
        bars = fig.add_subplot(grid[r, 1])
        for g, color in enumerate(colors):
            curves.plot(x, mean[r, g], color=color, linewidth=common.LINE_WIDTH * 0.8)
        curves.set_xlim(-0.5, columns * width - 0.5)
        curves.set_ylim(*y_range)
        curves.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        curves.set_yticks((-1.0, 0.0, 1.0) if has_tanh else (0.0, 0.5, 1.0), ["−1", "0", "1"] if has_tanh
                          else ["0", "0.5", "1"])
        curves.grid(True, axis="y", color="0.9", linewidth=0.6)
        curves.set_ylabel("mean", fontsize=common.LABEL_SIZE, labelpad=2)
        curves.set_title(payload["row_labels"][r], fontsize=common.PANEL_TITLE_SIZE, loc="left", y=1.0, pad=3)
        _saturation_bars(bars, closed[r], opened[r], colors, labels, bars_w)
        if r == 0:
            bars.set_title("closed", fontsize=common.PANEL_TITLE_SIZE, loc="left", y=1.0, pad=3)
            bars.set_title("open", fontsize=common.PANEL_TITLE_SIZE, loc="right", y=1.0, pad=3)
        for ax in (curves, bars):
            ax.tick_params(labelsize=common.TICK_SIZE, length=2.5, pad=1.5)
        if r == rows - 1:
            label = "time step" if width == 1 else f"time (bins of {width} steps)"
            curves.set_xlabel(label, fontsize=common.LABEL_SIZE, labelpad=2)
            bars.set_xlabel(f"% of {units}", fontsize=common.LABEL_SIZE, labelpad=2)
        else:
            curves.tick_params(axis="x", labelbottom=False)
            bars.tick_params(axis="x", labelbottom=False)
    common.card_title(fig, full_title)
    return fig


def _saturation_bars(ax: Any, closed: np.ndarray, opened: np.ndarray, colors: list[str], labels: list[str],
                     inches: float) -> None:
    """One stacked bar per gate: closed (dark, from the left), the rest (grey), open (from the right), in
    percent; each share written inside its part where it fits (``inches``: the panel's width)."""
    rest = 100 - closed - opened
    ticks = np.arange(len(labels))
    for g, color in enumerate(colors):
        dark = tuple(0.55 * c for c in to_rgb(color))
        parts = ((0.0, closed[g], dark, "white"), (closed[g], rest[g], "0.86", "black"),
                 (closed[g] + rest[g], opened[g], color, _text_on(color)))
        for start, share, fill, ink in parts:
            if not np.isfinite(share) or share <= 0:
                continue
            ax.barh(g, share, left=start, height=0.78, color=fill, linewidth=0)
            for text in (f"{share:.0f}%", f"{share:.0f}"):  # the axis says "%" where the sign has no room
                if common.text_width(text, common.TICK_SIZE) + 0.02 <= share / 100 * inches:
                    ax.text(start + share / 2, g, text, ha="center", va="center", color=ink,
                            fontsize=common.TICK_SIZE)
                    break
    ax.set_xlim(0, 100)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xticks((0, 50, 100))
    ax.set_yticks(ticks, labels)
    for tick, color in zip(ax.get_yticklabels(), colors):
        tick.set_color(color)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _text_on(color: str) -> str:
    """Black or white, whichever reads on ``color``."""
    red, green, blue = to_rgb(color)
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.55 else "white"


def gate_summary(record: RNNRecord) -> dict[str, dict[str, Any]]:
    """Per gate, over the valid steps of every recorded sequence (computed once per record, shared by
    :func:`reduce_gates` and :func:`gate_stats`):

    - ``curve``: ``(layers*directions, time)`` float64 sum over sequences of the mean over units;
    - ``low`` / ``high``: ``(layers*directions, units)`` how many valid steps each unit is left/right-saturated;
    - ``nonfinite``: ``""``, ``"NaN"``, ``"Inf"`` or ``"NaN and Inf"`` among the valid values.
    """
    cached = record.derived.get("gate_summary")
    if cached is not None and cached[0] is record.gates:
        return cached[1]
    valid = record.valid_mask()  # (B, T)
    padded = not record.all_valid
    summary = {}
    for gate, values in record.gates.items():
        lo, hi = gate_bounds(gate)
        values = values.float()
        unit_mean = values.mean(-1)  # (LD, B, T); non-finite values make it non-finite
        below, above = common.indicator(values, torch.lt, lo), common.indicator(values, torch.gt, hi)
        if padded:
            keep = valid.unsqueeze(-1).to(below.dtype)
            below, above = below.mul_(keep), above.mul_(keep)
            unit_mean = torch.where(valid, unit_mean, 0.0)
        nonfinite = ""
        if not bool(unit_mean.isfinite().all()):
            nonfinite = common.nonfinite_flag(values[:, valid] if padded else values)
        # reduced where the record lives; the (LD, T) and (LD, U) results cross to the host. Counted over
        # the (B*T) steps flattened into one axis.
        summary[gate] = {
            "curve": unit_mean.double().sum(1).cpu(),
            "low": common.exact_count(below.flatten(1, 2), 1).double().cpu(),
            "high": common.exact_count(above.flatten(1, 2), 1).double().cpu(),
            "nonfinite": nonfinite,
        }
    record.derived["gate_summary"] = (record.gates, summary)
    return summary


def gate_stats(record: RNNRecord) -> dict[str, float]:
    """Per gate and layer/direction, over every valid step, unit and sequence of the batch.

    - ``<gate>_mean``: mean activation.
    - ``<gate>_saturated_low`` / ``<gate>_saturated_high``: fraction of values left/right-saturated
      (thresholds in the module docstring).

    Empty for a module without gates. Names carry :func:`~lightning_rnnviz.render.common.row_suffix`.
    """
    rows = record.hidden.shape[0]
    steps = float(record.lengths.clamp(0, record.time).sum())  # valid steps of the batch
    summaries = {}
    for gate, summary in gate_summary(record).items():
        units = summary["low"].shape[-1]
        if steps == 0:
            nan = torch.full((rows,), float("nan"))
            summaries[gate] = (nan, nan, nan)
        else:
            summaries[gate] = (
                summary["curve"].sum(-1) / steps,
                summary["low"].sum(-1) / (steps * units),
                summary["high"].sum(-1) / (steps * units),
            )
    stats: dict[str, float] = {}
    for r in range(rows):
        suffix = common.row_suffix(record, r)
        for gate, (mean, low, high) in summaries.items():
            stats[f"{gate}_mean{suffix}"] = float(mean[r])
            stats[f"{gate}_saturated_low{suffix}"] = float(low[r])
            stats[f"{gate}_saturated_high{suffix}"] = float(high[r])
    return stats
