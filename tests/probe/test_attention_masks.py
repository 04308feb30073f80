"""Attention statistics under masks: ``key_counts`` from the call's masks, ``entropy_norm`` per query.

An ``nn.MultiheadAttention`` whose query and key projections (weights and biases) are zero scores every
key 0, so its weights are exactly uniform over the keys each query may attend to: ``entropy_norm`` must
be 1 whatever the masks. With one key scored far above the rest the weights are one-hot: 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_rnnviz import Probe
from lightning_rnnviz.render import attention_stats
from tests.helpers.reference import causal_mask, reference_mha

E, HEADS, B, TQ, TK = 8, 2, 3, 4, 5
LENGTHS = torch.tensor([5, 2, 4])

MASKS = [
    "none", "causal", "causal_float", "rectangular_is_causal", "bool", "float_inf", "3d_bool", "kpm",
    "kpm_float", "kpm_scattered", "kpm+causal", "kpm+3d_bool",
]
OPTIONS = [
    dict(), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True),
]


SQUARE = ("causal", "causal_float", "kpm+causal")  # self-attention: as many keys as queries


def _masks(kind: str, g: torch.Generator) -> dict:
    kw: dict = {}
    tk = TQ if kind in SQUARE else TK
    if kind.startswith("kpm"):
        pad = torch.arange(tk).unsqueeze(0) >= LENGTHS.clamp(max=tk).unsqueeze(1)
        if kind == "kpm_scattered":  # not right-padded: key_lengths cannot say it, key_counts can
            pad = torch.rand(B, tk, generator=g) > 0.6
            pad[:, 1] = False
        kw["key_padding_mask"] = pad
        if kind == "kpm_float":
            kw["key_padding_mask"] = torch.zeros(B, tk).masked_fill(pad, float("-inf"))
    if kind in SQUARE:
        mask = causal_mask(TQ)
        additive = torch.zeros(TQ, TQ).masked_fill(mask, float("-inf"))
        kw["attn_mask"] = additive if kind == "causal_float" else mask
        kw["is_causal"] = kind != "causal_float"
    if kind == "rectangular_is_causal":
        kw.update(attn_mask=causal_mask(TQ, TK), is_causal=True)
    if kind == "bool":
        kw["attn_mask"] = torch.rand(TQ, TK, generator=g) > 0.5
    if kind == "float_inf":  # an additive mask: 0 where allowed, -inf where not
        blocked = torch.rand(TQ, TK, generator=g) > 0.5
        kw["attn_mask"] = torch.zeros(TQ, TK).masked_fill(blocked, float("-inf"))
    if kind.endswith("3d_bool"):
        kw["attn_mask"] = torch.rand(B * HEADS, TQ, TK, generator=g) > 0.5
    if "attn_mask" in kw and kind not in (*SQUARE, "rectangular_is_causal"):
        m = kw["attn_mask"]
        (m[..., 0].fill_(False) if m.dtype == torch.bool else m[..., 0].fill_(0.0))  # no query fully masked
    if kw.get("key_padding_mask") is not None and "attn_mask" in kw and kind == "kpm+3d_bool":
        kw["attn_mask"][..., 1] = False  # key 1 is never padded: every query keeps a key
    return kw


def _uniform(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    with torch.no_grad():
        if mha.in_proj_weight is not None:
            mha.in_proj_weight[: 2 * mha.embed_dim] = 0
        else:
            mha.q_proj_weight.zero_()
            mha.k_proj_weight.zero_()
        if mha.in_proj_bias is not None:
            mha.in_proj_bias[: 2 * mha.embed_dim] = 0
    return mha


class Attn(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.attn = mha

    def forward(self, q, k, **kw):
        return self.attn(q, k, k, **kw)[0]


def _assert_counts(r, mha, q, k, kw):
    """``key_counts`` against the keys the reference gives any weight (uniform: every allowed key)."""
    expected = (reference_mha(mha, q, k, **kw) > 0).sum(-1)  # (B, H, Tq)
    if r.key_counts is None:
        assert bool((expected == r.attention.shape[-1]).all())
        return
    assert r.key_counts.dtype == torch.long
    assert torch.equal(r.key_counts.expand_as(expected), expected)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("kind", MASKS)
def test_uniform_attention_over_allowed_keys_has_entropy_norm_one(kind, opts):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mha = _uniform(nn.MultiheadAttention(E, HEADS, batch_first=True, **opts))
    tk = TQ if kind in SQUARE else TK
    q, k = torch.randn(B, TQ, E, generator=g), torch.randn(B, tk, E, generator=g)
    kw = _masks(kind, g)
    model = Attn(mha)
    with Probe(model, strict=True).record() as rec:
        model(q, k, **kw).sum().backward()
    r = rec["attn"]
    _assert_counts(r, mha, q, k, kw)
    stats = attention_stats(r)
    for h in range(HEADS):
        assert stats[f"entropy_norm/head{h}"] == pytest.approx(1.0, abs=1e-6), (kind, h, stats)
    if kind in ("causal", "kpm+causal") and not opts:
        assert r.key_counts is not None and int(r.key_counts.min()) == 1  # the first query sees one key


@pytest.mark.parametrize("kind", ["none", "causal", "kpm", "kpm+causal", "3d_bool", "float_inf"])
@pytest.mark.parametrize("opts", [dict(), dict(add_bias_kv=True, add_zero_attn=True)], ids=["plain", "extra"])
def test_one_hot_attention_has_entropy_norm_zero(kind, opts):
    """Key 0 (allowed for every query under every mask here) scores far above the others."""
    g = torch.Generator().manual_seed(2)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True, bias=False, **opts)
    with torch.no_grad():
        mha.in_proj_weight[: 2 * E] = torch.cat([torch.eye(E), torch.eye(E)]) * 30
        if mha.bias_k is not None:
            mha.bias_k.zero_()
    tk = TQ if kind in SQUARE else TK
    q = torch.ones(B, TQ, E)
    k = torch.zeros(B, tk, E)
    k[:, 0] = 1.0
    kw = _masks(kind, g)
    if "attn_mask" in kw and kw["attn_mask"].dtype == torch.bool:
        kw["attn_mask"][..., 0] = False
    model = Attn(mha)
    with Probe(model, strict=True).record() as rec:
        model(q, k, **kw)
    r = rec["attn"]
    assert torch.equal(r.attention[..., 0], torch.ones_like(r.attention[..., 0]))  # one-hot, exactly
    stats = attention_stats(r)
    for h in range(HEADS):
        assert stats[f"entropy_norm/head{h}"] == pytest.approx(0.0, abs=1e-6)
        assert stats[f"focus/head{h}"] == pytest.approx(1.0)


def test_fully_masked_queries_are_left_out_of_every_mean():
    torch.manual_seed(0)
    mha = _uniform(nn.MultiheadAttention(E, HEADS, batch_first=True))
    q, k = torch.randn(B, TQ, E), torch.randn(B, TK, E)
    mask = torch.zeros(TQ, TK, dtype=torch.bool)
    mask[2] = True  # query 2 may attend to nothing: NaN weights
    model = Attn(mha)
    with Probe(model).record() as rec:
        model(q, k, attn_mask=mask)
    r = rec["attn"]
    assert torch.isnan(r.attention[:, :, 2]).all()
    assert torch.equal(r.key_counts[:, :, 2], torch.zeros(B, 1, dtype=torch.long))
    stats = attention_stats(r)
    assert stats["entropy_norm/head0"] == pytest.approx(1.0, abs=1e-6)
    assert stats["entropy/head0"] == pytest.approx(torch.log(torch.tensor(5.0)).item(), abs=1e-6)
    assert stats["focus/head0"] == pytest.approx(0.2)


def test_unbatched_call_with_masks():
    torch.manual_seed(0)
    mha = _uniform(nn.MultiheadAttention(E, HEADS, add_bias_kv=True))
    q, k = torch.randn(TQ, E), torch.randn(TK, E)
    kw = dict(key_padding_mask=torch.tensor([False, False, False, True, True]), attn_mask=causal_mask(TQ, TK))
    model = Attn(mha)
    with Probe(model, strict=True).record() as rec:
        model(q, k, **kw)
    r = rec["attn"]
    # query t may attend to keys 0..t (at most 3 real keys), plus the bias key
    assert r.key_counts.tolist() == [[[2, 3, 4, 4]]]
    assert attention_stats(r)["entropy_norm/head1"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["eval_no_grad", "train"])
def test_transformer_encoder_masks_count_per_query(mode):
    """Eval + no_grad: the layers are followed from the encoder (``encoder_layer_step``) with its masks."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    for lay in encoder.layers:
        _uniform(lay.self_attn)
    encoder.train(mode == "train")
    S = 5
    src = torch.randn(B, S, E)
    kpm = torch.arange(S).unsqueeze(0) >= LENGTHS.unsqueeze(1)
    mask = causal_mask(S)
    ctx = torch.no_grad() if mode == "eval_no_grad" else torch.enable_grad()
    with Probe(encoder, strict=True).record() as rec:
        with ctx:
            encoder(src, mask=mask, src_key_padding_mask=kpm, is_causal=True)
    assert set(rec) == {"layers.0.self_attn", "layers.1.self_attn"}
    causal_counts = torch.arange(1, S + 1).unsqueeze(0)
    expected = torch.minimum(causal_counts, LENGTHS.unsqueeze(1))  # (B, S)
    for name in rec:
        r = rec[name]
        assert torch.equal(r.key_counts.expand(B, HEADS, S), expected.unsqueeze(1).expand(B, HEADS, S)), name
        stats = attention_stats(r)
        for h in range(HEADS):
            assert stats[f"entropy_norm/head{h}"] == pytest.approx(1.0, abs=1e-6), name


def test_decoder_layer_self_attention_with_causal_target_mask():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, HEADS, 16, batch_first=True)
    _uniform(layer.self_attn)
    _uniform(layer.multihead_attn)
    tgt, memory = torch.randn(B, TQ, E), torch.randn(B, TK, E)
    memory_kpm = torch.arange(TK).unsqueeze(0) >= LENGTHS.unsqueeze(1)
    with Probe(layer, strict=True).record() as rec:
        layer(tgt, memory, tgt_mask=causal_mask(TQ), tgt_is_causal=True, memory_key_padding_mask=memory_kpm)
    self_counts = rec["self_attn"].key_counts
    assert self_counts[0, 0].tolist() == [1, 2, 3, 4]
    assert rec["multihead_attn"].key_counts[:, 0, 0].tolist() == LENGTHS.tolist()
    for name in ("self_attn", "multihead_attn"):
        assert attention_stats(rec[name])["entropy_norm/head0"] == pytest.approx(1.0, abs=1e-6)


def test_custom_extractor_counts_the_keys_with_weight():
    class Masked(nn.Module):
        def forward(self, q, keys, pad):
            scores = torch.zeros(q.shape[0], keys.shape[1]).masked_fill(pad, float("-inf"))
            return torch.softmax(scores, -1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Masked()

        def forward(self, q, keys, pad, steps):
            return [self.attn(q, keys, pad) for _ in range(steps)]

    pad = torch.arange(TK).unsqueeze(0) >= LENGTHS.unsqueeze(1)
    model = M()
    probe = Probe(model, attention={"attn": lambda m, a, out: out})
    with probe.record() as rec:
        model(torch.randn(B, E), torch.randn(B, TK, E), pad, 3)
    r = rec["attn"]
    assert torch.equal(r.key_counts, LENGTHS.view(B, 1, 1).expand(B, 1, 3))
    assert attention_stats(r)["entropy_norm/head0"] == pytest.approx(1.0, abs=1e-6)
    with probe.record() as rec:
        model(torch.randn(B, E), torch.randn(B, TK, E), torch.zeros_like(pad), 2)
    assert rec["attn"].key_counts is None  # every key has weight
