"""Gate activations: mean over time per gate, and the per-unit saturation plot of Karpathy et al. (2015).

A gate value is *left-saturated* when it lies within 0.1 of its lower bound and *right-saturated* when it
lies within 0.1 of its upper bound: ``< 0.1`` / ``> 0.9`` for sigmoid gates (LSTM input, forget, output;
GRU reset, update), ``< -0.9`` / ``> 0.9`` for the tanh candidates (LSTM ``cell``, GRU ``new``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
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


def reduce_gates(record: RNNRecord, max_time: int = 256, max_units: int = 512) -> dict[str, Any] | None:
    """Cut what :func:`draw_gates` needs out of ``record``, over the whole batch and its valid steps.

    Args:
        record: the recorded module.
        max_time: most time points of the mean curves (longer sequences are averaged in bins).
        max_units: most units per gate in the saturation scatter (evenly spaced unit indices beyond that).

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
    """Left: mean activation of each gate over time; right: per-unit saturation fractions.

    One row of panels per layer/direction. In the right panels every point is a unit: x is the fraction
    of valid steps it is left-saturated, y right-saturated; points lie in the triangle ``x + y <= 1``.

    Args:
        payload: from :func:`reduce_gates`.
        step: training step for the title (``train step <n>``).
        title: replaces the heading ``"<module>: gate activations"``.
        validation: the picture shows the validation sample (``validation at train step <n>``).
    """
    heading = title or f"{payload['name']}: gate activations"
    full_title = common.compose_title(heading, payload, step, payload["nonfinite"], validation=validation)
    mean = payload["mean"]
    rows, _, columns = mean.shape
    if columns == 0:
        return common.message_figure(full_title, "no valid steps")
    names = payload["gates"]
    top = common.top_margin(full_title, 0.75)
    fig = common.new_figure(8.0, top + 0.55 + 0.35 + 1.55 * rows)
    grid = common.panel_grid(fig, rows, 2, top=top, left=0.7, right=0.25, width_ratios=(2.2, 1.0), wspace=0.9)
    width = payload["bin"]
    x = np.arange(columns) * width + (width - 1) / 2
    has_tanh = any(gate in TANH_GATES for gate in names)
    y_range = (-1.05, 1.05) if has_tanh else (-0.03, 1.03)
    triangle_x, triangle_y = (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    for r in range(rows):
        curves = fig.add_subplot(grid[r, 0])
        scatter = fig.add_subplot(grid[r, 1])
        for g, gate in enumerate(names):
            color = _GATE_COLORS.get(gate, f"C{g}")
            curves.plot(x, mean[r, g], color=color, linewidth=1.2)
            scatter.scatter(
                payload["low"][r, g], payload["high"][r, g], s=4, color=color, alpha=0.6, linewidths=0
            )
        curves.set_xlim(-0.5, columns * width - 0.5)
        curves.set_ylim(*y_range)
        curves.xaxis.set_major_locator(MaxNLocator(6, integer=True))
        curves.set_yticks((-1.0, -0.5, 0.0, 0.5, 1.0) if has_tanh else (0.0, 0.5, 1.0))
        curves.set_ylabel("mean activation", fontsize=common.LABEL_SIZE)
        curves.set_title(payload["row_labels"][r], fontsize=common.PANEL_TITLE_SIZE, loc="left", y=1.0)
        scatter.fill(triangle_x, triangle_y, color="0.93", zorder=0)
        scatter.set_xlim(-0.02, 1.02)
        scatter.set_ylim(-0.02, 1.02)
        scatter.set_xticks((0, 0.5, 1))
        scatter.set_yticks((0, 0.5, 1))
        scatter.set_ylabel("right-saturated", fontsize=common.LABEL_SIZE)
        shown = payload["units_shown"]
        units = (
            f"{shown} units"
            if shown == payload["hidden_size"]
            else f"{shown} of {payload['hidden_size']} units"
        )
        scatter.set_title(f"saturation, {units}", fontsize=common.TICK_SIZE + 1, loc="left", y=1.0)
        for ax in (curves, scatter):
            ax.tick_params(labelsize=common.TICK_SIZE)
        if r == rows - 1:
            label = "time step" if width == 1 else f"time (bins of {width} steps)"
            curves.set_xlabel(label, fontsize=common.LABEL_SIZE)
            scatter.set_xlabel("left-saturated (fraction of steps)", fontsize=common.LABEL_SIZE)
    handles = [
        Line2D(
            [],
            [],
            color=_GATE_COLORS.get(gate, f"C{g}"),
            label=gate + (" (tanh)" if gate in TANH_GATES else ""),
        )
        for g, gate in enumerate(names)
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - (top - 0.3) / fig.get_size_inches()[1]),
        ncols=len(handles),
        fontsize=common.LABEL_SIZE,
        frameon=False,
        handlelength=1.5,
        columnspacing=1.2,
    )
    fig.suptitle(full_title, fontsize=common.TITLE_SIZE)
    return fig


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
