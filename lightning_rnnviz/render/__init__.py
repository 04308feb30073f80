"""Records -> images: each figure kind is a ``reduce_*`` (record -> small picklable payload) and a ``draw_*``
(payload -> :class:`matplotlib.figure.Figure`), so that drawing can run in another process; ``*_stats``
functions compute scalars from the full record with torch.

Nothing here imports pyplot or selects a backend: :func:`figure_to_rgb` and :func:`figure_to_png`
rasterise with Agg and figures need no closing.

Example::

    >>> import torch
    >>> from lightning_rnnviz.probe.records import RNNRecord
    >>> from lightning_rnnviz.render import draw_hidden, figure_to_rgb, reduce_hidden
    >>> h = torch.rand(1, 2, 30, 16) - 0.5  # (layers*directions, batch, time, hidden)
    >>> rec = RNNRecord("rnn", "GRU", h, {}, None, None, None, torch.tensor([30, 20]))
    >>> figure_to_rgb(draw_hidden(reduce_hidden(rec, sample=1), step=10)).shape[2]
    3
"""

from lightning_rnnviz.render.attention import attention_stats, draw_attention, reduce_attention
from lightning_rnnviz.render.common import figure_to_png, figure_to_rgb, row_suffix
from lightning_rnnviz.render.gates import draw_gates, gate_stats, reduce_gates
from lightning_rnnviz.render.gradients import draw_grad_decay, draw_grad_norm, grad_stats, reduce_grad_norm
from lightning_rnnviz.render.hidden import draw_hidden, hidden_stats, reduce_hidden
from lightning_rnnviz.render.paint import (
    paint_attention,
    paint_gates,
    paint_grad_decay,
    paint_grad_norm,
    paint_hidden,
    paint_message,
)

__all__ = [
    "attention_stats",
    "draw_attention",
    "draw_gates",
    "draw_grad_decay",
    "draw_grad_norm",
    "draw_hidden",
    "figure_to_png",
    "figure_to_rgb",
    "gate_stats",
    "grad_stats",
    "hidden_stats",
    "paint_attention",
    "paint_gates",
    "paint_grad_decay",
    "paint_grad_norm",
    "paint_hidden",
    "paint_message",
    "reduce_attention",
    "reduce_gates",
    "reduce_grad_norm",
    "reduce_hidden",
    "row_suffix",
]
