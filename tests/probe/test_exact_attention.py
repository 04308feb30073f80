"""Probe attention records against a hand-written per-head softmax reference."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_rnnviz import Probe
from lightning_rnnviz.probe.probe import RNNVizWarning
from lightning_rnnviz.probe.records import AttentionRecord
from tests.helpers.reference import causal_mask, reference_additive_attention, reference_mha

TOL = dict(rtol=1e-5, atol=1e-6)


def _close(actual, expected, what="attention"):
    assert actual.dtype == torch.float32 and actual.device.type == "cpu"
    got, want = tuple(actual.shape), tuple(expected.shape)
    assert got == want, f"{what}: shape {got} != {want}"
    torch.testing.assert_close(actual, expected.float(), **TOL, msg=lambda m: f"{what}: {m}")


class Capture:
    """Our own pre-hook recording the exact arguments a submodule received (removed afterwards)."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[tuple, dict]] = []
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append((args, dict(kwargs)))

    def remove(self):
        self._handle.remove()


def reference_from_call(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return reference_mha(
        mha,
        bound["query"],
        bound["key"],
        bound.get("value"),
        key_padding_mask=bound.get("key_padding_mask"),
        attn_mask=bound.get("attn_mask"),
        is_causal=bool(bound.get("is_causal", False)),
    )


class AttnModel(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.attn = mha

    def forward(self, q, k, v, **kw):
        out, _ = self.attn(q, k, v, **kw)
        return out


# --------------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------------------------------

def _opts_id(opts: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in opts.items()) or "default"


OPTIONS = [
    dict(),
    dict(kdim=3, vdim=5),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(bias=False),
]
MASKS = ["none", "kpm", "bool_mask", "float_mask", "causal", "kpm+bool", "kpm+float", "3d_bool"]


def _mha_case(opts, masks, batch_first, seed=0):
    torch.manual_seed(seed)
    E, nh, B, Tq, Tk = 8, 2, 3, 4, 5
    mha = nn.MultiheadAttention(E, nh, batch_first=batch_first, **opts)
    g = torch.Generator().manual_seed(seed + 1)
    kd, vd = opts.get("kdim", E), opts.get("vdim", E)
    if masks == "causal":
        Tk = Tq
    q = torch.randn(B, Tq, E, generator=g)
    k = torch.randn(B, Tk, kd, generator=g)
    v = torch.randn(B, Tk, vd, generator=g)
    kw = {}
    lengths = torch.tensor([Tk, Tk - 2, Tk - 1])
    if "kpm" in masks:
        kw["key_padding_mask"] = torch.arange(Tk).unsqueeze(0) >= lengths.unsqueeze(1)
        if masks == "kpm+float":
            kw["key_padding_mask"] = torch.zeros(B, Tk).masked_fill(kw["key_padding_mask"], float("-inf"))
    if "bool" in masks:
        shape = (B * nh, Tq, Tk) if masks.startswith("3d") else (Tq, Tk)
        m = torch.rand(shape, generator=g) > 0.6
        m[..., 0] = False  # never a fully masked row
        kw["attn_mask"] = m
    if "float" in masks:
        kw["attn_mask"] = torch.randn(Tq, Tk, generator=g)
    if masks == "causal":
        kw["attn_mask"] = causal_mask(Tq)
        kw["is_causal"] = True
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return mha, q, k, v, kw, lengths


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=_opts_id)
@pytest.mark.parametrize("masks", MASKS)
def test_mha_matches_reference(batch_first, opts, masks):
    mha, q, k, v, kw, _ = _mha_case(opts, masks, batch_first)
    model = AttnModel(mha)
    need_weights = masks != "causal"  # causal + need_weights=False: PyTorch drops the mask for SDPA
    with Probe(model).record() as rec:
        out = model(q, k, v, need_weights=need_weights, **kw)
        out.sum().backward()
    assert set(rec) == {"attn"}
    r = rec["attn"]
    assert isinstance(r, AttentionRecord)
    assert r.kind == "MultiheadAttention"
    assert r.exact is True
    expected = reference_mha(mha, q, k, v, **kw)
    _close(r.attention, expected)
    assert r.heads == mha.num_heads
    torch.testing.assert_close(r.attention.sum(-1), torch.ones(r.attention.shape[:-1]))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_mha_records_per_head_whatever_the_call_asks(need_weights, average):
    mha, q, k, v, kw, _ = _mha_case({}, "kpm+bool", batch_first=True, seed=3)
    model = AttnModel(mha)
    with Probe(model).record() as rec:
        model(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
    _close(rec["attn"].attention, reference_mha(mha, q, k, v, **kw))


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_is_causal_hint(need_weights):
    """``is_causal=True`` with its mask: with need_weights=False PyTorch hands the mask to SDPA as a hint."""
    mha, q, k, v, kw, _ = _mha_case({}, "causal", batch_first=True, seed=4)
    model = AttnModel(mha)
    with Probe(model).record() as rec:
        model(q, k, v, need_weights=need_weights, **kw)
    a = rec["attn"].attention
    _close(a, reference_mha(mha, q, k, v, **kw))
    assert not a[..., causal_mask(a.shape[-2], a.shape[-1])].any()


def test_mha_key_lengths_from_right_padded_mask():
    mha, q, k, v, kw, lengths = _mha_case({}, "kpm", batch_first=True)
    model = AttnModel(mha)
    with Probe(model).record() as rec:
        model(q, k, v, **kw)
    r = rec["attn"]
    assert r.key_lengths is not None
    assert torch.equal(r.key_lengths.long(), lengths)
    # padded keys get exactly zero weight
    for b, n in enumerate(lengths.tolist()):
        assert not r.attention[b, :, :, n:].any()
    mha, q, k, v, _, _ = _mha_case({}, "none", batch_first=True)
    model = AttnModel(mha)
    with Probe(model).record() as rec:
        model(q, k, v)
    assert rec["attn"].key_lengths is None


@pytest.mark.parametrize("with_mask", [False, True])
def test_mha_unbatched(with_mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 3, add_bias_kv=True)
    q, k = torch.randn(4, 6), torch.randn(5, 6)
    kw = {}
    if with_mask:
        kw = dict(key_padding_mask=torch.tensor([False, False, False, True, True]),
                  attn_mask=causal_mask(4, 5))
    model = AttnModel(mha)
    with Probe(model).record() as rec:
        model(q, k, k, **kw).sum().backward()
    a = rec["attn"].attention
    assert tuple(a.shape) == (1, 3, 4, 6)
    _close(a, reference_mha(mha, q, k, k, **kw))


def test_mha_self_attention_eval_no_grad_fast_path():
    """Eval + no_grad + batch_first self-attention takes MHA's native fast path; still recorded."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    kpm = torch.arange(5).unsqueeze(0) >= torch.tensor([[5], [2], [4]])
    model = AttnModel(mha)
    with Probe(model).record() as rec:
        with torch.inference_mode():
            model(x, x, x, key_padding_mask=kpm, need_weights=False)
    _close(rec["attn"].attention, reference_mha(mha, x, x, x, key_padding_mask=kpm))


def test_mha_dropout_train_mode_records_pre_dropout_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).train()
    model = AttnModel(mha)
    q, k = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    kpm = torch.arange(6).unsqueeze(0) >= torch.tensor([[6], [3], [5]])

    torch.manual_seed(99)
    out_plain, w_plain = mha(q, k, k, key_padding_mask=kpm, average_attn_weights=False)
    torch.manual_seed(99)
    with Probe(model).record() as rec:
        out_probe, w_probe = mha(q, k, k, key_padding_mask=kpm, average_attn_weights=False)
    assert torch.equal(out_plain, out_probe)
    assert torch.equal(w_plain, w_probe)  # the user's (dropped-out) weights are untouched
    a = rec["attn"].attention
    _close(a, reference_mha(mha, q, k, k, key_padding_mask=kpm))
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))  # pre-dropout: rows sum to 1
    assert not torch.allclose(w_plain.detach(), a)  # dropout really happened in the user's weights


# --------------------------------------------------------------------------------------------------
# transformer layers
# --------------------------------------------------------------------------------------------------


class EncDec(nn.Module):
    """An encoder layer (inside an ``nn.TransformerEncoder`` unless ``standalone``) and a decoder layer."""

    def __init__(self, batch_first: bool, norm_first: bool, dropout: float = 0.3, standalone: bool = False):
        super().__init__()
        kw = dict(d_model=8, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=batch_first,
                  norm_first=norm_first)
        layer = nn.TransformerEncoderLayer(**kw)
        self.enc = layer if standalone else nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.dec = nn.TransformerDecoderLayer(**kw)

    def forward(self, src, tgt, src_kpm=None, tgt_mask=None, tgt_is_causal=False):
        memory = self.enc(src, src_key_padding_mask=src_kpm)
        return self.dec(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=src_kpm,
                        tgt_is_causal=tgt_is_causal)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("standalone", [False, True], ids=["in_encoder", "standalone"])
def test_transformer_layers(training, batch_first, norm_first, standalone):
    torch.manual_seed(0)
    model = EncDec(batch_first, norm_first, standalone=standalone).train(training)
    enc_attn = "enc.self_attn" if standalone else "enc.layers.0.self_attn"
    B, S, T = 3, 6, 4
    src, tgt = torch.randn(B, S, 8), torch.randn(B, T, 8)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    kpm = torch.arange(S).unsqueeze(0) >= torch.tensor([[6], [3], [5]])
    tgt_mask = causal_mask(T)
    caps = {n: Capture(model.get_submodule(n)) for n in (enc_attn, "dec.self_attn", "dec.multihead_attn")}
    # A standalone encoder layer in eval mode is not recorded: a hook would switch off its fast path.
    skipped = standalone and not training
    expect = pytest.warns(RNNVizWarning, match="standalone") if skipped else contextlib.nullcontext()
    try:
        with expect, Probe(model).record() as rec:
            out = model(src, tgt, kpm, tgt_mask, tgt_is_causal=True)
            out.sum().backward()
    finally:
        for c in caps.values():
            c.remove()
    recorded = {n for n in caps if not (skipped and n == enc_attn)}
    assert set(rec) == recorded
    if skipped:
        assert enc_attn in rec.errors
    for name in recorded:
        cap = caps[name]
        # calls[0] is the user's call; in eval mode inside an encoder the probe may re-run the layer after it
        assert len(cap.calls) >= 1, name
        if name != enc_attn or training:
            assert len(cap.calls) == 1, name
        mha = model.get_submodule(name)
        expected = reference_from_call(mha, *cap.calls[0])
        _close(rec[name].attention, expected, name)
    assert tuple(rec["dec.self_attn"].attention.shape) == (B, 2, T, T)
    assert tuple(rec["dec.multihead_attn"].attention.shape) == (B, 2, T, S)
    assert not rec["dec.self_attn"].attention[..., tgt_mask].any()
    if not skipped:
        assert tuple(rec[enc_attn].attention.shape) == (B, 2, S, S)
        assert torch.equal(rec[enc_attn].key_lengths.long(), torch.tensor([6, 3, 5]))
    for b, n in enumerate([6, 3, 5]):
        assert not rec["dec.multihead_attn"].attention[b, ..., n:].any()
        if not skipped:
            assert not rec[enc_attn].attention[b, ..., n:].any()


def _encoder_reference(encoder: nn.TransformerEncoder, src, mask=None, kpm=None, is_causal=False):
    """Per-layer attention of an encoder in float64, run layer by layer on the ordinary (non-fused) path."""
    enc = copy.deepcopy(encoder).double().eval()
    x = src.detach().double()
    add_mask = None if mask is None else mask.double() if mask.is_floating_point() else mask
    out = []
    with torch.enable_grad():  # parameters require grad: PyTorch never takes its fast path here
        for layer in enc.layers:
            a = layer.norm1(x) if layer.norm_first else x
            out.append(reference_mha(layer.self_attn, a, a, a, key_padding_mask=kpm, attn_mask=add_mask,
                                     is_causal=is_causal))
            x = layer(x, src_mask=add_mask, src_key_padding_mask=kpm, is_causal=is_causal).detach()
    return out


class Wrapped(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.enc = encoder

    def forward(self, src, **kw):
        return self.enc(src, **kw)


ENCODER_CASES = {
    # name: (norm_first, enable_nested_tensor, mask kind)
    "post_norm": (False, False, "kpm"),
    "pre_norm": (True, False, "kpm"),
    "nested": (False, True, "kpm"),
    "causal": (False, False, "causal"),
    "no_mask": (False, False, "none"),
}


# PyTorch's nested-tensor path warns once per process that nested tensors are a prototype
NESTED_PROTOTYPE = "ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning"


@pytest.mark.filterwarnings(NESTED_PROTOTYPE)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
@pytest.mark.parametrize("watched", ["all", "second"])
@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoder_inference_fast_path_is_recorded(case, watched, mode):
    """Eval + no autograd + batch_first is PyTorch's fused encoder fast path (and, with a padding mask and
    ``enable_nested_tensor``, its nested-tensor path), which never calls ``self_attn``; validation loops
    run exactly like this. The layers are recorded from the enclosing ``nn.TransformerEncoder`` and the
    user's output stays bit-identical."""
    norm_first, nested, mask_kind = ENCODER_CASES[case]
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(8), enable_nested_tensor=nested)
    model = Wrapped(encoder).eval()
    B, S = 3, 5
    lengths = torch.tensor([5, 2, 4])
    src = torch.randn(B, S, 8)
    kw = {}
    if mask_kind == "kpm":
        kw["src_key_padding_mask"] = torch.arange(S).unsqueeze(0) >= lengths.unsqueeze(1)
    elif mask_kind == "causal":
        kw.update(mask=nn.Transformer.generate_square_subsequent_mask(S), is_causal=True)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": contextlib.nullcontext}[mode]
    names = ["enc.layers.0.self_attn", "enc.layers.1.self_attn"]
    modules = None if watched == "all" else names[1:]

    with ctx():
        plain = model(src, **kw)
    with Probe(model, modules=modules).record() as rec:
        with ctx():
            probed = model(src, **kw)
    assert torch.equal(plain, probed)
    if nested and mode != "grad":
        # the nested path really ran: padded positions come back as exact zeros
        padded = torch.arange(S).unsqueeze(0) >= lengths.unsqueeze(1)
        assert not probed[padded].any()

    expected_names = names if watched == "all" else names[1:]
    assert set(rec) == set(expected_names)
    assert not rec.errors
    refs = _encoder_reference(encoder, src, kw.get("mask"), kw.get("src_key_padding_mask"), kw.get("is_causal", False))
    for name in expected_names:
        r = rec[name]
        assert r.kind == "MultiheadAttention"
        want = refs[names.index(name)]
        if nested and name == names[1]:
            # the nested path computes nothing at padded positions: only real queries' rows are defined
            for b, n in enumerate(lengths.tolist()):
                _close(r.attention[b, :, :n], want[b, :, :n], f"{name}[{b}]")
        else:
            _close(r.attention, want, name)
        if mask_kind == "kpm":
            assert torch.equal(r.key_lengths.long(), lengths)
            for b, n in enumerate(lengths.tolist()):
                assert not r.attention[b, ..., n:].any()
        if mask_kind == "causal":
            assert not r.attention[..., causal_mask(S)].any()


def test_encoder_batch_first_false_eval_is_recorded():
    """Sequence-first encoders never take the fast path but are still recorded through the encoder."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=2,
                                    enable_nested_tensor=False).eval()
    src = torch.randn(5, 3, 8)
    kpm = torch.arange(5).unsqueeze(0) >= torch.tensor([[5], [2], [4]])
    with Probe(encoder).record() as rec:
        with torch.no_grad():
            encoder(src, src_key_padding_mask=kpm)
    refs = _encoder_reference(encoder, src, kpm=kpm)
    assert set(rec) == {"layers.0.self_attn", "layers.1.self_attn"}
    for i in range(2):
        _close(rec[f"layers.{i}.self_attn"].attention, refs[i], f"layer {i}")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_standalone_encoder_layer_in_eval_mode_is_not_recorded(mode):
    """A hook anywhere on a standalone eval-mode encoder layer would switch off its fused fast path, so the
    probe leaves it alone: one warning per probe, the name in ``errors``, and the user's output unchanged."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.rnn = nn.GRU(8, 4, batch_first=True)

        def forward(self, x, kpm):
            return self.rnn(self.enc(x, src_key_padding_mask=kpm))[0]

    model = M().eval()
    x = torch.randn(3, 5, 8)
    kpm = torch.arange(5).unsqueeze(0) >= torch.tensor([[5], [3], [4]])
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        plain = model(x, kpm)
    probe = Probe(model)
    with pytest.warns(RNNVizWarning, match="standalone") as caught:
        with probe.record() as rec:
            with ctx():
                probed = model(x, kpm)
    assert len([w for w in caught if issubclass(w.category, RNNVizWarning)]) == 1
    assert "enc.self_attn" in str(caught[0].message)
    assert torch.equal(plain, probed)
    assert "enc.self_attn" not in rec
    assert "enc.self_attn" in rec.errors
    assert "standalone" in rec.errors["enc.self_attn"]
    assert set(rec) == {"rnn"}  # the other modules are still recorded
    # once per probe: a second block says nothing more, and still lists the module in errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with probe.record() as rec2:
            with ctx():
                again = model(x, kpm)
    assert torch.equal(plain, again)
    assert "enc.self_attn" in rec2.errors and set(rec2) == {"rnn"}
    # in training mode the same layer is hooked as before and recorded
    model.train()
    with Probe(model).record() as rec3:
        model(x, kpm)
    assert "enc.self_attn" in rec3 and not rec3.errors


def test_encoder_with_mixed_train_eval_layers_is_skipped_without_touching_rng():
    """A training-mode layer before an eval-mode watched one cannot be followed (its dropout mask is
    unknown): the watched layer is skipped with a warning, and no RNG is drawn."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True), 2,
                                    enable_nested_tensor=False)
    encoder.layers[0].train()
    encoder.layers[1].eval()
    x = torch.randn(3, 5, 8)
    torch.manual_seed(1)
    plain = encoder(x)
    after_plain = torch.get_rng_state()
    torch.manual_seed(1)
    with pytest.warns(RNNVizWarning, match="training mode"):
        with Probe(encoder).record() as rec:
            probed = encoder(x)
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert torch.equal(plain, probed)
    assert "layers.1.self_attn" not in rec and "layers.1.self_attn" in rec.errors
    assert "layers.0.self_attn" in rec  # the training-mode layer itself is hooked as usual


# --------------------------------------------------------------------------------------------------
# custom (Bahdanau) attention through an extractor
# --------------------------------------------------------------------------------------------------


class Additive(nn.Module):
    def __init__(self, dim: int, heads: int = 0):
        super().__init__()
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Parameter(torch.randn(dim))
        self.heads = heads  # 0: return (B, T); >0: return (B, heads, 1, T) (same map per head)

    def forward(self, query, keys, mask=None):
        scores = torch.tanh(self.w_q(query).unsqueeze(1) + self.w_k(keys)) @ self.v  # (B, T)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = (weights.unsqueeze(-1) * keys).sum(1)
        if self.heads:
            weights = weights[:, None, None, :].expand(-1, self.heads, 1, -1)
        return context, weights


class Decoder(nn.Module):
    def __init__(self, dim: int = 4, heads: int = 0):
        super().__init__()
        self.attn = Additive(dim, heads)
        self.cell = nn.GRUCell(dim, dim)

    def forward(self, keys, steps, mask=None):
        h = keys.mean(1)
        outs = []
        for _ in range(steps):
            context, _ = self.attn(h, keys, mask)
            h = self.cell(context, h)
            outs.append(h)
        return torch.stack(outs, 1)


def _weights_of(module, args, output):
    return output[1]


@pytest.mark.parametrize("heads", [0, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_custom_attention_rows_stack_in_call_order(heads, masked):
    torch.manual_seed(0)
    model = Decoder(heads=heads)
    B, T, S = 3, 5, 4
    keys = torch.randn(B, T, 4)
    mask = (torch.arange(T).unsqueeze(0) >= torch.tensor([[5], [2], [4]])) if masked else None
    queries = []
    qcap = model.attn.register_forward_pre_hook(lambda m, a: queries.append(a[0].detach().clone()))
    try:
        with Probe(model, attention={"attn": _weights_of}).record() as rec:
            model(keys, S, mask).sum().backward()
    finally:
        qcap.remove()
    assert len(queries) == S
    assert set(rec) == {"attn", "cell"}
    r = rec["attn"]
    assert isinstance(r, AttentionRecord)
    assert r.kind == "custom"
    H = heads or 1
    assert tuple(r.attention.shape) == (B, H, S, T)
    a = model.attn
    for step, q in enumerate(queries):
        expected = reference_additive_attention(q, keys, a.w_q.weight, a.w_k.weight, a.v, mask)
        for h in range(H):
            _close(r.attention[:, h, step], expected, f"step {step} head {h}")
    # the GRUCell driven by the same loop is recorded too, one step per call
    assert tuple(rec["cell"].hidden.shape) == (1, B, S, 4)


def test_custom_attention_full_matrix_in_one_call():
    """An extractor returning ``(batch, T_out, T_in)`` from a single call gives those rows as is."""
    torch.manual_seed(0)

    class Dot(nn.Module):
        def forward(self, q, k):
            w = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)
            return w @ k, w

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.dot = Dot()

        def forward(self, q, k):
            return self.dot(q, k)[0]

    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    model = M()
    with Probe(model, attention={"dot": _weights_of}).record() as rec:
        model(q, k)
    expected = torch.softmax(q.double() @ k.double().transpose(1, 2) / 2.0, dim=-1)
    _close(rec["dot"].attention, expected.unsqueeze(1))


def test_custom_attention_matches_pattern():
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = Decoder()
            self.second = Decoder()

        def forward(self, keys):
            return torch.cat([self.first(keys, 2), self.second(keys, 3)], 1)

    model = Two()
    keys = torch.randn(2, 5, 4)
    with Probe(model, modules=["*.attn"], attention={"*.attn": _weights_of}).record() as rec:
        model(keys)
    assert set(rec) == {"first.attn", "second.attn"}
    assert rec["first.attn"].attention.shape[2] == 2
    assert rec["second.attn"].attention.shape[2] == 3


def test_mha_weights_are_recomputed_when_the_recording_is_finished_from_copies_taken_at_the_call(monkeypatch):
    """The capture only copies the call's inputs and the module's parameters; the per-head weights are
    recomputed in ``finish`` (on the recording worker where there is one), once per module however often it
    was called, and equal the reference of the call as it was: the optimizer step and an in-place change of
    the input between the call and the finish change nothing."""
    import lightning_rnnviz.probe.build as build

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    want = reference_mha(mha, x, x, x)
    recomputed = []
    real = build.mha_weights
    monkeypatch.setattr(build, "mha_weights", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    with Probe(mha, strict=True).capture() as captured:
        mha(x * 2, x * 2, x * 2)  # an earlier call of the module: not the one shown
        out, _ = mha(x, x, x, need_weights=False)
        out.sum().backward()
    assert recomputed == []  # nothing recomputed during the user's forward and backward
    captured.hand_off()
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(1.0)  # the optimizer step
        x.mul_(-3.0)  # the input changed in place
    recording = captured.finish(None)
    assert recomputed == [1]
    _close(recording[""].attention, want)
    assert recording[""].query_is_key is True
