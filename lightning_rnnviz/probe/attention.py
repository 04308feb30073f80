"""Per-head, pre-dropout attention weights of ``nn.MultiheadAttention``, recomputed off the forward path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mha_weights(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Recompute the attention weights of one ``nn.MultiheadAttention`` call, per head and without dropout.

    The module's own parameters are used through ``F.multi_head_attention_forward`` with
    ``need_weights=True, average_attn_weights=False, training=False``, so the user's forward (which may
    have taken the fused fast path with ``need_weights=False``) is untouched and no RNG is drawn.

    Args:
        mha: the module.
        query, key, value: the call's inputs, in the module's layout (``batch_first`` or not), batched
            or unbatched.
        key_padding_mask, attn_mask, is_causal: as passed to the call.

    Returns:
        ``(batch, heads, T_query, T_key)`` weights, batch-first; unbatched input gives ``batch == 1``.
    """
    batched = query.dim() == 3
    if mha.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    separate = not mha._qkv_same_embed_dim
    with torch.no_grad():
        _, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            mha.embed_dim,
            mha.num_heads,
            mha.in_proj_weight,
            mha.in_proj_bias,
            mha.bias_k,
            mha.bias_v,
            mha.add_zero_attn,
            0.0,
            mha.out_proj.weight,
            mha.out_proj.bias,
            training=False,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=mha.q_proj_weight if separate else None,
            k_proj_weight=mha.k_proj_weight if separate else None,
            v_proj_weight=mha.v_proj_weight if separate else None,
            average_attn_weights=False,
            is_causal=is_causal,
        )
    return weights if batched else weights.unsqueeze(0)


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


def encoder_layer_attention_input(layer: nn.TransformerEncoderLayer, src: Tensor) -> Tensor:
    """The tensor ``layer.self_attn`` sees: ``src``, or ``norm1(src)`` when ``norm_first``."""
    if not layer.norm_first:
        return src
    norm = layer.norm1
    return F.layer_norm(src, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def unnest(src: Tensor) -> tuple[Tensor, Tensor | None]:
    """A nested tensor (the encoder's fast path) as a zero-padded tensor and its key padding mask."""
    if not src.is_nested:
        return src, None
    lengths = torch.tensor([t.shape[0] for t in src.unbind()], device=src.device)
    padded = src.to_padded_tensor(0.0)
    steps = torch.arange(padded.shape[1], device=src.device)
    return padded, steps.unsqueeze(0) >= lengths.unsqueeze(1)
