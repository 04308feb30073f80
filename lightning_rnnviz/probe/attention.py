"""Per-head, pre-dropout attention weights of ``nn.MultiheadAttention``, recomputed off the forward path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mha_forward(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    params: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One ``nn.MultiheadAttention`` call recomputed off the forward path: its output and per-head weights.

    The module's own parameters are used through ``F.multi_head_attention_forward`` with
    ``need_weights=True, average_attn_weights=False, training=False``, so the user's forward (which may
    have taken the fused fast path with ``need_weights=False``) is untouched and no RNG is drawn. No
    module is called, so no forward hook fires.

    Args:
        mha: the module.
        query, key, value: the call's inputs, in the module's layout (``batch_first`` or not), batched
            or unbatched.
        key_padding_mask, attn_mask, is_causal: as passed to the call.
        params: the module's parameters by name (``named_parameters()``) as they were at the call, in place
            of its current ones (a recording finished after the optimizer step).

    Returns:
        The attention output in the module's layout, and ``(batch, heads, T_query, T_key)`` weights,
        batch-first; unbatched input gives ``batch == 1``.
    """
    batched = query.dim() == 3
    given = params or {}

    def param(name: str) -> Tensor | None:
        return given[name] if name in given else getattr(mha, name)

    # Under autocast the call may have seen bf16/fp16 activations; recompute in the weights' dtype.
    dtype = mha.out_proj.weight.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    if key_padding_mask is not None and key_padding_mask.is_floating_point():
        key_padding_mask = key_padding_mask.to(dtype)
    if mha.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    separate = not mha._qkv_same_embed_dim
    with torch.no_grad():
        output, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            mha.embed_dim,
            mha.num_heads,
            param("in_proj_weight"),
            param("in_proj_bias"),
            param("bias_k"),
            param("bias_v"),
            mha.add_zero_attn,
            0.0,
            given.get("out_proj.weight", mha.out_proj.weight),
            given.get("out_proj.bias", mha.out_proj.bias),
            training=False,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=param("q_proj_weight") if separate else None,
            k_proj_weight=param("k_proj_weight") if separate else None,
            v_proj_weight=param("v_proj_weight") if separate else None,
            average_attn_weights=False,
            is_causal=is_causal,
        )
    if mha.batch_first and batched:
        output = output.transpose(0, 1)
    return output, (weights if batched else weights.unsqueeze(0))


def mha_weights(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    params: dict[str, Tensor] | None = None,
) -> Tensor:
    """``(batch, heads, T_query, T_key)`` weights of one call, per head and without dropout; see
    :func:`mha_forward`."""
    return mha_forward(mha, query, key, value, key_padding_mask, attn_mask, is_causal, params)[1]


def key_lengths_from_mask(key_padding_mask: Tensor | None, batched: bool) -> Tensor | None:
    """Number of real keys per sequence when ``key_padding_mask`` marks a right-padded batch, else ``None``.

    Boolean masks mark padding with ``True``; float masks with ``-inf``.
    """
    if key_padding_mask is None:
        return None
    mask = key_padding_mask if batched else key_padding_mask.unsqueeze(0)
    padded = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    lengths = (~padded).sum(-1)
    steps = torch.arange(padded.shape[-1], device=padded.device)
    right_padded = torch.equal(padded, steps.unsqueeze(0) >= lengths.unsqueeze(1))
    return lengths.cpu() if right_padded else None


def allowed_key_counts(
    weights_shape: tuple[int, ...],
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    extra: int = 0,
) -> Tensor | None:
    """``(batch, heads or 1, T_query)`` long: how many keys each query may attend to, from the call's masks.

    A key is not allowed where a boolean mask is ``True`` or a float mask is ``-inf``; ``is_causal``
    without ``attn_mask`` hides the future keys. The ``extra`` columns that ``add_bias_kv`` and
    ``add_zero_attn`` append are always allowed. Masks of a larger batch are cut to the recorded one.

    Args:
        weights_shape: ``(batch, heads, T_query, T_key)`` of the recorded weights, ``extra`` columns included.
        key_padding_mask: ``(batch, T_key)`` or ``(T_key,)`` as passed to the call.
        attn_mask: ``(T_query, T_key)`` or ``(batch*heads, T_query, T_key)`` as passed to the call.
        is_causal: as passed to the call.
        extra: columns appended after the keys.

    Returns:
        The counts on the CPU; ``None`` when every key is allowed for every query.
    """
    batch, heads, queries, total = weights_shape
    keys = total - extra

    def blocked_by(mask: Tensor) -> Tensor:
        return mask if mask.dtype == torch.bool else torch.isneginf(mask)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(queries, keys, dtype=torch.bool).triu(1)
    blocked = None
    if attn_mask is not None:
        mask = blocked_by(attn_mask)
        if mask.dim() == 3:
            blocked = mask[: batch * heads].reshape(batch, heads, queries, keys)
        else:
            blocked = mask.reshape(1, 1, queries, keys)
    if key_padding_mask is not None:
        padded = blocked_by(key_padding_mask).reshape(-1, keys)[:batch].reshape(batch, 1, 1, keys)
        blocked = padded if blocked is None else blocked.to(padded.device) | padded
    if blocked is None or not bool(blocked.any()):
        return None
    counts = (~blocked).sum(-1)
    return (counts.expand(batch, counts.shape[1], queries) + extra).long().cpu().contiguous()


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def encoder_layer_step(
    layer: nn.TransformerEncoderLayer,
    src: Tensor,
    src_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """An eval-mode ``nn.TransformerEncoderLayer`` written out with its own parameters.

    Used to follow a stack of encoder layers whose fused fast path must not be disturbed by hooks: no
    module is called (so no hook fires and no RNG is drawn: eval mode has no dropout).

    Returns:
        The layer's output (equal to the module's up to float rounding) and its self-attention
        weights ``(batch, heads, T, T)``.
    """

    def attention(x: Tensor) -> tuple[Tensor, Tensor]:
        return mha_forward(layer.self_attn, x, x, x, src_key_padding_mask, src_mask, is_causal)

    def feed_forward(x: Tensor) -> Tensor:
        return F.linear(layer.activation(F.linear(x, layer.linear1.weight, layer.linear1.bias)),
                        layer.linear2.weight, layer.linear2.bias)

    with torch.no_grad():
        if layer.norm_first:
            attended, weights = attention(_layer_norm(layer.norm1, src))
            x = src + attended
            x = x + feed_forward(_layer_norm(layer.norm2, x))
        else:
            attended, weights = attention(src)
            x = _layer_norm(layer.norm1, src + attended)
            x = _layer_norm(layer.norm2, x + feed_forward(x))
    return x, weights


def blocked_key_counts(blocked: Tensor | None, weights_shape: tuple[int, ...]) -> Tensor | None:
    """``(batch, heads or 1, T_query)`` long: how many keys each query may attend to, from a mask of blocked keys.

    Args:
        blocked: boolean, ``True`` where a key is not allowed, broadcastable to ``(batch, heads or 1,
            T_query, T_key)`` (a leading axis of 1 stands for every sequence); ``None`` when nothing is.
        weights_shape: ``(batch, heads, T_query, T_key)`` of the recorded weights.

    Returns:
        The counts on the CPU, as :func:`allowed_key_counts` gives them; ``None`` when every key is
        allowed for every query.
    """
    if blocked is None or not bool(blocked.any()):
        return None
    batch, _, queries, _ = weights_shape
    counts = (~blocked).sum(-1)
    return counts.expand(batch, counts.shape[1], queries).long().cpu().contiguous()
