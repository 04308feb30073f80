"""Attention classes of other libraries read without an extractor: one entry of :data:`KNOWN` per class.

The libraries are never imported: a class is recognised by the top-level package of the module that
defines it and its ``__qualname__``, on the class itself or in its MRO (a subclass that keeps the
library's ``forward``). Each entry knows how the library's ``forward`` is called and in which layout it
returns its weights, reads those weights (or, where the library applies dropout to the weights it
returns, recomputes them before dropout from the module's own parameters, as the module computed them)
and turns the mask of the call into the keys each query was allowed to attend to.

To add a library: one reader function and one :class:`KnownAttention` entry, and a test that runs the
library's class and compares the record with a reference computed step by step from its parameters.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (weights (batch, heads, T_out, T_in) of the first ``limit`` sequences, keys blocked (broadcastable to
# (batch, 1, T_out, T_in), True = not allowed) or None)
Read = tuple[Tensor, Tensor | None]


@dataclass(frozen=True)
class KnownAttention:
    """How to read one library's attention class.

    Attributes:
        library: the library as users know it, for messages.
        package: top-level package of the module that defines the class.
        qualname: the class's ``__qualname__``.
        tested: the library versions whose layout the tests pin.
        returns: the layout of the weights ``forward`` returns, for messages.
        reader: ``(entry, module, args, kwargs, output, limit) -> (weights, blocked)``, see :meth:`read`.
        returner: ``(entry, module, args, kwargs, output) -> weights``, see :meth:`returned`.
    """

    library: str
    package: str
    qualname: str
    tested: str
    returns: str
    reader: Callable[[KnownAttention, nn.Module, tuple, dict, Any, int | None], Read]
    returner: Callable[[KnownAttention, nn.Module, tuple, dict, Any], Tensor]

    @property
    def label(self) -> str:
        return f"`{self.qualname}` of {self.library}"

    def read(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, limit: int | None) -> Read:
        """One call: the weights ``(batch, heads, T_out, T_in)`` of the first ``limit`` sequences (all with
        ``None``), per head and before any dropout, and the keys the call's mask blocked.

        Raises:
            ValueError: the module returned weights in a shape unlike the known layout.
        """
        return self.reader(self, module, args, kwargs, output, limit)

    def returned(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
        """The weights exactly as ``forward`` returned them (dropout included), turned to ``(batch, heads,
        T_out, T_in)``: what an extractor that returns them transposed is told apart from."""
        return self.returner(self, module, args, kwargs, output)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _drops(dropout: nn.Module | None) -> bool:
    """Whether a dropout module may change what passes through it in this call (a subclass of
    ``nn.Dropout``, such as darts' Monte Carlo dropout, may drop in eval mode too)."""
    if dropout is None or not getattr(dropout, "p", 0.0):
        return False
    return dropout.training or type(dropout) is not nn.Dropout


def _layout_error(entry: KnownAttention, weights: Any, expected: tuple[int, ...]) -> ValueError:
    shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
    return ValueError(
        f"{entry.label} returned attention weights of shape {shape}, not {entry.returns} = {expected} as "
        f"known for {entry.library} {entry.tested}; record it with an extractor, "
        "`attention={name: lambda module, args, output: <weights (batch, heads, T_out, T_in)>}`"
    )


# --- pytorch-forecasting and darts: forward(q, k, v, mask=None) -> (output, attn (B, T_out, H, T_in)) ------
# One query and one key projection per head (``q_layers[i]``, ``k_layers[i]``), a value projection shared
# by the heads; in ``attention`` (a scaled dot-product module) the scores are divided by sqrt(d_k) when
# its ``scale`` is set, ``masked_fill(mask, fill)`` (mask True = blocked; pytorch-forecasting fills with
# its ``mask_bias``, darts with the dtype's lowest value), softmax over the keys, then its own dropout
# (none in either library's TFT). The heads are stacked on axis 2.


def _per_head_returned(entry: KnownAttention, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
    q, k = _arg(args, kwargs, 0, "q"), _arg(args, kwargs, 1, "k")
    weights = output[1] if isinstance(output, tuple) and len(output) == 2 else output
    expected = (q.shape[0], q.shape[1], module.n_head, k.shape[1])
    if not isinstance(weights, Tensor) or tuple(weights.shape) != expected:
        raise _layout_error(entry, weights, expected)
    return weights.detach().transpose(1, 2)


def _per_head_recompute(module: nn.Module, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """The weights before the scaled dot-product module's dropout, from the module's parameters."""
    inner = module.attention
    rows = []
    for q_layer, k_layer in zip(module.q_layers, module.k_layers):
        queries = F.linear(q, q_layer.weight, q_layer.bias)
        keys = F.linear(k, k_layer.weight, k_layer.bias)
        scores = torch.bmm(queries, keys.transpose(1, 2))
        if inner.scale:
            scores = scores / torch.as_tensor(keys.shape[-1], dtype=scores.dtype, device=scores.device).sqrt()
        if mask is not None:
            fill = getattr(inner, "mask_bias", None)
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min if fill is None else fill)
        rows.append(torch.softmax(scores, dim=2))
    return torch.stack(rows, dim=1)


def _per_head_read(entry: KnownAttention, module: nn.Module, args: tuple, kwargs: dict, output: Any,
                   limit: int | None) -> Read:
    returned = _per_head_returned(entry, module, args, kwargs, output)
    batch, _, queries, keys = returned.shape
    mask = _arg(args, kwargs, 3, "mask")
    blocked = None
    if mask is not None:
        blocked = torch.broadcast_to(mask.bool(), (batch, queries, keys))[:limit].unsqueeze(1)
    if not _drops(getattr(module.attention, "dropout", None)):
        return returned[:limit], blocked
    q, k = _arg(args, kwargs, 0, "q")[:limit], _arg(args, kwargs, 1, "k")[:limit]
    with torch.no_grad():
        weights = _per_head_recompute(module, q, k, None if blocked is None else blocked[:, 0])
    return weights, blocked


# --- neuralforecast: forward(x, mask_future_timesteps=True) -> (output, attn_prob (B, H, T, T)) ----------
# One linear layer gives the queries and keys of every head and one shared value; the scores are
# multiplied by ``scale`` (d_head ** -0.5), the causal ``_mask`` buffer (-inf above the diagonal) is
# added when ``mask_future_timesteps``, softmax over the keys, then ``attn_dropout`` on the weights
# it returns: in training mode those are after dropout, so they are recomputed before it.


def _fused_returned(entry: KnownAttention, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
    x = _arg(args, kwargs, 0, "x")
    weights = output[1] if isinstance(output, tuple) and len(output) == 2 else output
    expected = (x.shape[0], module.n_head, x.shape[1], x.shape[1])
    if not isinstance(weights, Tensor) or tuple(weights.shape) != expected:
        raise _layout_error(entry, weights, expected)
    return weights.detach()


def _fused_recompute(module: nn.Module, x: Tensor, future: bool) -> Tensor:
    batch, steps, _ = x.shape
    heads, width = module.n_head, module.d_head
    projected = F.linear(x, module.qkv_linears.weight, module.qkv_linears.bias)
    q = projected[..., : heads * width].reshape(batch, steps, heads, width).transpose(1, 2)
    k = projected[..., heads * width: 2 * heads * width].reshape(batch, steps, heads, width).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)) * module.scale
    if future:
        scores = scores + module._mask
    return torch.softmax(scores, dim=3)


def _fused_read(entry: KnownAttention, module: nn.Module, args: tuple, kwargs: dict, output: Any,
                limit: int | None) -> Read:
    returned = _fused_returned(entry, module, args, kwargs, output)
    future = bool(_arg(args, kwargs, 1, "mask_future_timesteps", True))
    steps = returned.shape[-1]
    blocked = torch.isneginf(module._mask).reshape(1, 1, steps, steps) if future else None
    if not _drops(module.attn_dropout):
        return returned[:limit], blocked
    with torch.no_grad():
        return _fused_recompute(module, _arg(args, kwargs, 0, "x")[:limit], future), blocked


KNOWN: dict[tuple[str, str], KnownAttention] = {
    (entry.package, entry.qualname): entry for entry in (
        KnownAttention(library="pytorch-forecasting", package="pytorch_forecasting",
                       qualname="InterpretableMultiHeadAttention", tested="1.8",
                       returns="(batch, T_out, heads, T_in)", reader=_per_head_read, returner=_per_head_returned),
        KnownAttention(library="darts", package="darts", qualname="_InterpretableMultiHeadAttention", tested="0.48",
                       returns="(batch, T_out, heads, T_in)", reader=_per_head_read, returner=_per_head_returned),
        KnownAttention(library="neuralforecast", package="neuralforecast", qualname="InterpretableMultiHeadAttention",
                       tested="3.3", returns="(batch, heads, T, T)", reader=_fused_read, returner=_fused_returned),
    )
}


def known_attention(cls: type) -> KnownAttention | None:
    """The entry for a module class: its own or the nearest base class's in :data:`KNOWN`, provided the
    class still runs that base class's ``forward`` (an overridden ``forward`` may return anything)."""
    for base in getattr(cls, "__mro__", ()):
        entry = KNOWN.get((base.__module__.split(".")[0], base.__qualname__))
        if entry is not None:
            return entry if getattr(cls, "forward", None) is getattr(base, "forward", None) else None
    return None


class LibraryAttention(abc.ABC):  # noqa: B024 - a virtual base class, with nothing to implement
    """Virtual base class of the classes in :data:`KNOWN`: ``isinstance(module, LibraryAttention)`` tells
    a known library's attention module without importing the library. Nothing inherits from it."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        return known_attention(other) is not None


def head_count(module: nn.Module) -> tuple[str, int] | None:
    """The attribute by which a module reveals its number of heads, and that number, if it does."""
    for attribute in ("num_heads", "n_head", "n_heads", "nhead", "num_attention_heads"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attribute, value
    return None


def says_attention(cls: type, at_end: bool = False) -> bool:
    """Whether the name of a class or of one of its bases says attention (``...Attention...``,
    ``...Attn...``); with ``at_end``, whether it ends so (an attention class, not one named for its part)."""
    for base in getattr(cls, "__mro__", (cls,)):
        name = base.__name__.lower()
        if name.endswith(("attention", "attn")) if at_end else ("attention" in name or "attn" in name):
            return True
    return False
