"""Hidden states: a units x time heatmap of one sequence, and summary statistics over the batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_rnnviz.render import common
from lightning_rnnviz.render._lazy import torch

if TYPE_CHECKING:
    from lightning_rnnviz.probe.records import RNNRecord

TOKEN_CHARS = 10  # most characters of a token label on the time axis


def reduce_hidden(
    record: RNNRecord,
    sample: int = 0,
    top_k: int = 64,
    max_time: int = 256,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Cut what :func:`draw_hidden` needs out of ``record``: one sequence, at most ``top_k`` units per row.

    Padded steps (``t >= lengths[sample]``) are dropped. When ``hidden_out > top_k`` each layer/direction
    keeps the ``top_k`` units whose state varies most over the sequence (units holding NaN/Inf are kept
    first so that the problem stays visible), in unit order. Sequences longer than ``max_time`` are
    averaged in bins of equal width.

    Args:
        record: the recorded module.
        sample: which sequence of the batch to show.
        top_k: most units shown per layer/direction.
        max_time: most time columns shown.
        labels: one token per time step of the sequence, for the time axis; dropped when time is binned.

    Returns:
        A small picklable dict of numpy arrays, strings and numbers; ``values`` is
        ``(layers*directions, units, columns)``.

    Raises:
        ValueError: ``sample`` out of range, ``top_k``/``max_time`` not positive, or too few ``labels``.
    """
    sample = common.check_sample(sample, record.batch)
    top_k = common.check_positive("top_k", top_k)
    max_time = common.check_positive("max_time", max_time)
    length = int(record.lengths[sample])
    hidden = record.hidden[:, sample, :length, :].float()  # (LD, L, H)
    rows, _, hidden_out = hidden.shape
    tokens = common.check_labels("labels", labels, length)

    if hidden_out > top_k:
        finite = hidden.isfinite()
        if length > 0:
            variance = torch.where(finite, hidden, 0.0).var(dim=1, unbiased=False)  # (LD, H)
        else:
            variance = hidden.new_zeros(rows, hidden_out)
        score = torch.where(finite.all(dim=1), variance, torch.inf)
        units = score.topk(top_k, dim=1).indices.sort(dim=1).values  # (LD, k)
        hidden = torch.gather(hidden, 2, units.unsqueeze(1).expand(rows, length, top_k))
        units = common.host(units)
    else:
        units = np.broadcast_to(np.arange(hidden_out), (rows, hidden_out))
    # selected and binned where the record lives: only (LD, k, columns) crosses to the host
    values, width = common.bin_axis(hidden.transpose(1, 2), max_time)  # (LD, k, columns)

    bounded = common.hidden_is_tanh_bounded(record)
    finite_values = values[np.isfinite(values)]
    limit = 1.0 if bounded or finite_values.size == 0 else float(np.abs(finite_values).max())
    return {
        **common.record_header(record),
        "sample": sample,
        "length": length,
        "values": values.astype(np.float32, copy=False),
        "units": units.astype(np.int64),
        "hidden_out": int(hidden_out),
        "bin": width,
        "limit": limit if limit > 0 else 1.0,
        "bounded": bounded,
        "labels": tokens if width == 1 else None,
        "num_layers": record.num_layers,
        "num_directions": record.num_directions,
        "row_labels": [record.layer_label(i) for i in range(rows)],
        "nonfinite": common.nonfinite_flag(values),
        # where each later call of a chain of calls begins on this sequence's time axis
        "call_starts": _call_starts(record, sample, length),
    }


def _call_starts(record: RNNRecord, sample: int, length: int) -> list[int]:
    starts = getattr(record, "call_starts", None)
    if starts is None:
        return []
    return [int(s) for s in starts[1:, sample].tolist() if 0 < int(s) < length]


def draw_hidden(payload: dict[str, Any], *, step: int | None = None, title: str | None = None,
                validation: bool = False) -> Figure:
    """Heatmap of ``h_t``, units x time, one panel per layer (rows) and direction (columns).

    Args:
        payload: from :func:`reduce_hidden`.
        step: training step for the title (``train step <n>``).
        title: replaces the heading ``"<module>: hidden state h_t, sequence <n>"``; the step, the NaN
            warning and the approximation note are always added.
        validation: the picture shows the validation sample (``validation at train step <n>``).
    """
    heading = title or f"{payload['name']}: hidden state h_t, sequence {payload['sample']}"
    full_title = common.compose_title(heading, payload, step, payload["nonfinite"], width=1000,
                                      validation=validation)
    values = payload["values"]
    rows, units, columns = values.shape
    if columns == 0 or units == 0:
        return common.message_figure(full_title, f"sequence {payload['sample']} has no valid steps")

    nrows, ncols = payload["num_layers"], payload["num_directions"]
    tokens = payload["labels"]
    selected = payload["hidden_out"] > units
    note = f"top {units} of {payload['hidden_out']} units by variance" if selected else ""
    left, wspace = 0.62, 0.42
    panel_w = (common.FIGURE_WIDTH - left - common.COLORBAR_MARGIN - wspace * (ncols - 1)) / ncols
    # a rotated token label at 9 pt needs about 1/6 inch
    shown = common.tick_positions(columns, max(3, int(panel_w * 6)))
    bottom = 0.34 + (common.label_extent([tokens[t] for t in shown], limit=TOKEN_CHARS) if tokens else 0.18)
    top = common.top_margin(full_title, 0.22) + (0.2 if note else 0.0)
    panel_h = 1.15 if nrows > 1 else 1.6
    fig = common.new_figure(common.FIGURE_WIDTH, top + bottom + panel_h * nrows + 0.32 * (nrows - 1))
    grid = common.panel_grid(fig, nrows, ncols, left=left, right=common.COLORBAR_MARGIN, top=top, bottom=bottom,
                             hspace=0.32, wspace=wspace)
    width = payload["bin"]
    extent = (-0.5, columns * width - 0.5, units - 0.5, -0.5)
    cmap = common.colormap(common.DIVERGING_CMAP)
    limit = payload["limit"]
    interpolation = common.interpolation_for(values.shape, fig, grid[0, 0])
    image = None
    for index in range(rows):
        layer, direction = divmod(index, ncols)
        ax = fig.add_subplot(grid[layer, direction])
        image = ax.imshow(
            np.ma.masked_invalid(values[index]),
            aspect="auto",
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            interpolation=interpolation,
            extent=extent,
        )
        for start in payload.get("call_starts", ()):
            ax.axvline(start - 0.5, color="black", linewidth=1.5, linestyle="--")  # the next call begins
        ax.set_title(payload["row_labels"][index], fontsize=common.PANEL_TITLE_SIZE, loc="left", y=1.0, pad=3)
        ticks = common.tick_positions(units, 4)
        ax.set_yticks(ticks, [str(u) for u in payload["units"][index][ticks]])
        ax.tick_params(labelsize=common.TICK_SIZE, length=2.5, pad=1.5)
        if direction == 0:
            ax.set_ylabel("unit", fontsize=common.LABEL_SIZE, labelpad=2)
        if tokens:
            ax.set_xticks(shown, [common.short_label(tokens[t], TOKEN_CHARS) for t in shown]
                          if layer == nrows - 1 else [])
            ax.tick_params(axis="x", labelrotation=90)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(4 if ncols > 1 else 6, integer=True))
            if layer != nrows - 1:
                ax.tick_params(axis="x", labelbottom=False)
        if layer == nrows - 1:
            label = "time step" if width == 1 else f"time (bins of {width} steps)"
            ax.set_xlabel(label, fontsize=common.LABEL_SIZE, labelpad=2)
    if note:
        fig.text(0.5, 1 - (top - 0.22) / fig.get_size_inches()[1], note, ha="center", va="bottom",
                 fontsize=common.TICK_SIZE, color="0.3")

    label = "h_t" + (" (tanh range)" if payload["bounded"] else "")
    return common.finish_heatmap(fig, image, label, bottom, top, payload["nonfinite"], full_title)


def hidden_stats(record: RNNRecord) -> dict[str, float]:
    """Summary statistics of ``h_t`` over every valid step of the batch, per layer/direction.

    - ``mean_abs``: mean of ``|h|`` over valid steps and units.
    - ``saturated``: fraction of ``|h| > 0.95`` (only for tanh-bounded kinds).
    - ``step_change``: mean over consecutive valid pairs ``(t-1, t)`` of ``||h_t - h_{t-1}||_2``.

    Names carry :func:`~lightning_rnnviz.render.common.row_suffix`. A statistic with nothing to average is
    NaN; NaN/Inf in the states propagate.
    """
    valid = record.valid_mask()  # (B, T)
    pairs = valid[:, 1:] & valid[:, :-1]  # (B, T-1)
    padded = not record.all_valid
    bounded = common.hidden_is_tanh_bounded(record)
    stats: dict[str, float] = {}
    for index in range(record.hidden.shape[0]):
        suffix = common.row_suffix(record, index)
        states = record.hidden[index].float()  # (B, T, H)
        magnitude = (states[valid] if padded else states).abs()  # no copy of the states without padding
        stats["mean_abs" + suffix] = _mean(magnitude)
        if bounded:
            count = magnitude.numel()
            saturated = common.exact_count(common.indicator(magnitude, torch.gt, 0.95))
            stats["saturated" + suffix] = float(saturated) / count if count else float("nan")
        change = torch.linalg.vector_norm(states[:, 1:] - states[:, :-1], dim=-1)  # (B, T-1)
        stats["step_change" + suffix] = _mean(change[pairs] if padded else change)
    return stats


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")
