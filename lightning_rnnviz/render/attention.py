"""Attention weights: per-head query x key heatmaps of one sequence of the batch, and per-head entropy and focus."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_rnnviz.render import common
from lightning_rnnviz.render._lazy import torch

if TYPE_CHECKING:
    from lightning_rnnviz.probe.records import AttentionRecord

TOKEN_CHARS = 10  # most characters of a token label on an axis


def reduce_attention(
    record: AttentionRecord,
    sample: int = 0,
    max_heads: int = 8,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    max_steps: int = 256,
    self_attention: bool | None = None,
) -> dict[str, Any]:
    """Cut what :func:`draw_attention` needs out of ``record``: the first ``max_heads`` heads of one sample.

    Padded keys (beyond ``record.key_lengths[sample]``) are cropped; in self-attention the padded queries
    are too, the same steps of the same sequence. Longer axes than ``max_steps`` are binned: queries are
    averaged and keys summed, so a binned row still sums to one.

    Args:
        record: the recorded module.
        sample: which sample of the batch to show.
        max_heads: most heads shown.
        query_labels: one token per real query (output) step; dropped when queries are binned.
        key_labels: one token per real key (input) step; dropped when keys are binned.
        max_steps: most rows and columns per heatmap.
        self_attention: whether the queries are the keys' sequence; ``None`` decides by
            :func:`is_self_attention`.

    Returns:
        A small picklable dict; ``weights`` is ``(heads shown, queries, keys)``, ``queries`` and ``keys``
        the real steps shown (before binning), ``self_attention`` whether padded queries were cropped,
        ``cross_attention`` whether ``self_attention=False`` said the queries are another sequence's.

    Raises:
        ValueError: ``sample`` out of range, ``max_heads``/``max_steps`` not positive, or too few labels.
    """
    batch, heads, queries, keys = record.attention.shape
    sample = common.check_sample(sample, batch)
    max_heads = common.check_positive("max_heads", max_heads)
    max_steps = common.check_positive("max_steps", max_steps)
    cross_attention = self_attention is False  # said, not guessed: its axes say output and input
    if self_attention is None:
        self_attention = is_self_attention(record)
    if record.key_lengths is not None:
        keys = min(keys, int(record.key_lengths[sample]))
        if self_attention:
            queries = min(queries, keys)
    shown = min(heads, max_heads)
    weights = record.attention[sample, :shown, :queries, :keys].float()  # (h, Tq, Tk)
    query_tokens = common.check_labels("query_labels", query_labels, queries)
    key_tokens = common.check_labels("key_labels", key_labels, keys)
    flag = common.nonfinite_flag(weights)
    # binned where the record lives; only the binned weights cross to the host
    weights, query_bin = common.bin_tensor(weights, max_steps, axis=1, reduce="mean")
    weights, key_bin = common.bin_tensor(weights, max_steps, axis=2, reduce="sum")
    weights = common.host(weights)
    finite = weights[np.isfinite(weights)]
    peak = float(finite.max()) if finite.size else 1.0
    return {
        **common.record_header(record),
        "sample": sample,
        "weights": weights.astype(np.float32, copy=False),
        "heads": heads,
        "queries": queries,
        "keys": keys,
        "self_attention": bool(self_attention),
        "cross_attention": cross_attention,
        "query_bin": query_bin,
        "key_bin": key_bin,
        "query_labels": query_tokens if query_bin == 1 else None,
        "key_labels": key_tokens if key_bin == 1 else None,
        "vmax": peak if peak > 0 else 1.0,
        "nonfinite": flag,
    }


def is_self_attention(record: AttentionRecord) -> bool:
    """Whether ``record``'s queries are taken to be its keys' sequence, so that a padded key is a padded
    query too: what the call showed (:attr:`AttentionRecord.query_is_key`) where it is known; else a
    ``key_padding_mask`` gave its real keys (``key_lengths``) and there are as many queries as keys. Cross-attention between two sequences of equal padded length passes this test too: give
    :func:`reduce_attention` ``self_attention=False`` for it; self-attention with ``add_bias_kv`` or
    ``add_zero_attn`` (more keys than queries) does not: give ``self_attention=True``.

    Example::

        >>> import torch
        >>> from lightning_rnnviz.probe.records import AttentionRecord
        >>> weights = torch.full((2, 1, 4, 4), 0.25)
        >>> is_self_attention(AttentionRecord("attn", "MultiheadAttention", weights, torch.tensor([4, 2])))
        True
        >>> is_self_attention(AttentionRecord("attn", "MultiheadAttention", weights))  # no padding known
        False
        >>> is_self_attention(AttentionRecord("attn", "MultiheadAttention", weights, torch.tensor([4, 2]),
        ...                                   query_is_key=False))  # the call showed another key
        False
    """
    queries, keys = record.attention.shape[-2:]
    said = getattr(record, "query_is_key", None)
    if said is not None:  # what the call showed (``nn.MultiheadAttention`` called with its query as its key)
        return bool(said) and queries == keys
    return record.key_lengths is not None and queries == keys


def attention_heading(payload: Mapping[str, Any]) -> str:
    """An attention picture's heading, the same in both painters: ``"<module>: self-attention, sequence <n>"``
    where the queries are known to be the keys' sequence (``payload["self_attention"]``), else
    ``"<module>: attention, sequence <n>"``."""
    what = "self-attention" if payload.get("self_attention") else "attention"
    return f"{payload['name']}: {what}, sequence {payload['sample']}"


def axis_titles(payload: Mapping[str, Any]) -> tuple[str, str]:
    """The titles of the query (rows) and key (columns) axes, the same in both painters: ``"query step"``
    and ``"key step"`` in self-attention, both steps of the same sequence; ``"query (output) step"`` and
    ``"key (input) step"`` across two sequences (an encoder-decoder's attention: its queries from the
    output, its keys the input), known as such (``payload["cross_attention"]``) or with fewer or more
    queries than keys. Unknown with as many queries as keys (it may be self-attention): ``"query step"``
    and ``"key step"``.

    Example::

        >>> axis_titles({"self_attention": False, "queries": 5, "keys": 9})
        ('query (output) step', 'key (input) step')
        >>> axis_titles({"self_attention": False, "cross_attention": True, "queries": 7, "keys": 7})
        ('query (output) step', 'key (input) step')
        >>> axis_titles({"self_attention": True, "queries": 7, "keys": 7})
        ('query step', 'key step')
    """
    if payload.get("self_attention"):
        return "query step", "key step"
    if payload.get("cross_attention") or payload["queries"] != payload["keys"]:
        return "query (output) step", "key (input) step"
    return "query step", "key step"


def draw_attention(payload: dict[str, Any], *, step: int | None = None, title: str | None = None,
                   validation: bool = False) -> Figure:
    """Heatmap per head (rows: query steps, columns: key steps, :func:`axis_titles`) with one shared colour
    bar.

    Only real steps are drawn: padded keys are cropped, and in self-attention padded queries
    (:func:`reduce_attention`).

    Args:
        payload: from :func:`reduce_attention`.
        step: training step for the title (``train step <n>``).
        title: replaces the heading ``"<module>: attention, sequence <n>"`` (:func:`attention_heading`).
        validation: the picture shows the validation sample (``validation at train step <n>``).
    """
    heading = title or attention_heading(payload)
    if payload["heads"] > payload["weights"].shape[0]:
        heading += f" (showing {payload['weights'].shape[0]} of {payload['heads']} heads)"
    full_title = common.compose_title(heading, payload, step, payload["nonfinite"], width=1000,
                                      validation=validation)
    weights = payload["weights"]
    shown, rows, columns = weights.shape
    if rows == 0 or columns == 0:
        return common.message_figure(full_title, f"sequence {payload['sample']} has no real keys or queries")

    ncols = min(shown, 2 if shown <= 4 else 3)
    nrows = math.ceil(shown / ncols)
    query_tokens, key_tokens = payload["query_labels"], payload["key_labels"]
    gap = 0.12
    left = 0.3 + (common.label_extent(query_tokens, limit=TOKEN_CHARS) if query_tokens else 0.3)
    panel = min(2.2, (common.FIGURE_WIDTH - left - common.COLORBAR_MARGIN - gap * (ncols - 1)) / ncols)
    most_ticks = max(3, int(panel * 6))  # a token label at 9 pt needs about 1/6 inch
    key_ticks = common.tick_positions(columns, most_ticks)
    if key_tokens:
        bottom = 0.34 + common.label_extent([key_tokens[t] for t in key_ticks], limit=TOKEN_CHARS)
    else:
        bottom = 0.5
    top = common.top_margin(full_title, 0.22)
    fig = common.new_figure(common.FIGURE_WIDTH, top + bottom + (gap + 0.2) * (nrows - 1) + panel * nrows)
    grid = common.panel_grid(fig, nrows, ncols, left=left, right=common.COLORBAR_MARGIN, top=top, bottom=bottom,
                             hspace=gap + 0.2, wspace=gap)
    query_bin, key_bin = payload["query_bin"], payload["key_bin"]
    query_axis, key_axis = axis_titles(payload)
    extent = (-0.5, columns * key_bin - 0.5, rows * query_bin - 0.5, -0.5)
    cmap = common.colormap(common.SEQUENTIAL_CMAP)
    interpolation = common.interpolation_for(weights.shape, fig, grid[0, 0])
    image = None
    for h in range(shown):
        row, col = divmod(h, ncols)
        ax = fig.add_subplot(grid[row, col])
        image = ax.imshow(
            np.ma.masked_invalid(weights[h]),
            aspect="auto",
            cmap=cmap,
            vmin=0.0,
            vmax=payload["vmax"],
            interpolation=interpolation,
            extent=extent,
        )
        ax.set_title(f"head {h}", fontsize=common.PANEL_TITLE_SIZE, loc="left", y=1.0, pad=3)
        first_col, last_row = col == 0, h + ncols >= shown
        # inner panels share the outer panels' axes; skipping their ticks saves much of the drawing time
        if not last_row:
            ax.set_xticks([])
        elif key_tokens:
            ax.set_xticks(key_ticks, [common.short_label(key_tokens[t], TOKEN_CHARS) for t in key_ticks])
            ax.tick_params(axis="x", labelrotation=90)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(3 if ncols > 1 else 5, integer=True))
        if not first_col:
            ax.set_yticks([])
        elif query_tokens:
            ticks = common.tick_positions(rows, most_ticks)
            ax.set_yticks(ticks, [common.short_label(query_tokens[t], TOKEN_CHARS) for t in ticks])
        else:
            ax.yaxis.set_major_locator(MaxNLocator(3 if nrows > 1 else 5, integer=True))
        ax.tick_params(labelsize=common.TICK_SIZE, length=2.5, pad=1.5)
        # one title per axis, centred on the panels: on the panel at the bottom left
        if first_col and last_row:
            width, height = fig.get_size_inches()
            ax.set_xlabel(_axis_label(key_axis, key_bin), fontsize=common.LABEL_SIZE)
            ax.set_ylabel(_axis_label(query_axis, query_bin), fontsize=common.LABEL_SIZE)
            across = (left + (width - common.COLORBAR_MARGIN - left) / 2) / width
            ax.xaxis.set_label_coords(across, 0.04 / height, transform=fig.transFigure)
            ax.xaxis.label.set_verticalalignment("bottom")
            ax.yaxis.set_label_coords(0.04 / width, (bottom + (height - top - bottom) / 2) / height,
                                      transform=fig.transFigure)
            ax.yaxis.label.set_verticalalignment("top")
    label = "weight" + (" (key bin sum)" if key_bin > 1 else "")
    return common.finish_heatmap(fig, image, label, bottom, top, payload["nonfinite"], full_title)


def attention_stats(record: AttentionRecord) -> dict[str, float]:
    """Per head, over every sample and query of the batch (padded keys excluded).

    - ``entropy/head<h>``: mean of ``-sum_k p log p`` (nats).
    - ``entropy_norm/head<h>``: mean of each query's entropy divided by ``log`` of the number of keys
      that query may attend to: ``record.key_counts`` (from the call's masks, causal ones included),
      else its sample's real keys (``key_lengths``), else all keys. 1 means uniform over the allowed
      keys, 0 one-hot. A query with fewer than 2 allowed keys carries no entropy information and is
      left out of this mean (``NaN`` when no query is left).
    - ``focus/head<h>``: mean of the largest weight of each query.

    Where ``key_counts`` says a query may attend to no key at all (its weights are ``NaN``), that query
    is left out of all three means; so are the padded queries of a self-attention call
    (``record.query_is_key``, with ``key_lengths``): their rows are padding, as their keys are.

    Example::

        >>> import torch
        >>> from lightning_rnnviz.probe.records import AttentionRecord
        >>> rec = AttentionRecord("attn", "MultiheadAttention", torch.full((1, 1, 2, 4), 0.25))
        >>> {k: round(v, 4) for k, v in attention_stats(rec).items()}
        {'entropy/head0': 1.3863, 'entropy_norm/head0': 1.0, 'focus/head0': 0.25}
        >>> causal = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).reshape(1, 1, 2, 2)  # uniform over allowed keys
        >>> counts = torch.tensor([[[1, 2]]])  # the first query may attend to one key only
        >>> stats = attention_stats(AttentionRecord("attn", "MultiheadAttention", causal, key_counts=counts))
        >>> round(stats["entropy_norm/head0"], 4)  # the one-key query is left out
        1.0
    """
    batch, heads, queries, keys = record.attention.shape
    device = record.attention.device  # reduced there; the per-head means cross to the host
    if record.key_lengths is None:
        real = torch.full((batch,), keys, dtype=torch.int64, device=device)
    else:
        real = record.key_lengths.to(device, torch.int64).clamp(max=keys)
    key_mask = torch.arange(keys, device=device).unsqueeze(0) < real.unsqueeze(1)  # (B, Tk)
    p = record.attention.float()  # (B, H, Tq, Tk)
    if not bool(key_mask.all()):
        p = torch.where(key_mask[:, None, None, :], p, 0.0)
    # p log p with 0 log 0 = 0 (the clamp only moves log's argument off zero); all heads at once
    entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1).double()  # (B, H, Tq)
    focus = (p.amax(-1) if keys else p.sum(-1)).double()
    if record.key_counts is not None:
        counts = record.key_counts.to(device, torch.int64).expand(batch, heads, queries)
        attended = counts > 0
    else:
        counts = real[:, None, None].expand(batch, heads, queries)
        attended = torch.ones(batch, heads, queries, dtype=torch.bool, device=device)
    informative = counts > 1
    if record.query_is_key and record.key_lengths is not None and queries == keys:
        # self-attention (the call's query was its key): a padded key's query row is padding too, not data
        real_query = (torch.arange(queries, device=device).unsqueeze(0) < real.unsqueeze(1))[:, None, :]
        attended, informative = attended & real_query, informative & real_query
    entropy_norm = entropy / counts.clamp(min=2).double().log()
    # per-head means where the record lives: three numbers a head cross to the host
    means = torch.stack([_head_means(entropy, attended), _head_means(entropy_norm, informative),
                         _head_means(focus, attended)]).tolist()  # (3, H)
    stats: dict[str, float] = {}
    for h in range(heads):
        stats[f"entropy/head{h}"] = means[0][h]
        stats[f"entropy_norm/head{h}"] = means[1][h]
        stats[f"focus/head{h}"] = means[2][h]
    return stats


def _head_means(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``(H,)`` mean over batch and queries of ``values`` ``(B, H, Tq)`` where ``keep``; NaN where none is kept."""
    return torch.where(keep, values, 0.0).sum((0, 2)) / keep.sum((0, 2))


def _axis_label(text: str, width: int) -> str:
    return text if width == 1 else f"{text} (bins of {width})"

