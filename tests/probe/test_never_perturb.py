"""The probe must never change what the model computes, nor leave anything behind."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_rnnviz import Probe, RNNVizWarning
from lightning_rnnviz.probe.records import RNNRecord

# --------------------------------------------------------------------------------------------------
# models with every source of randomness we can think of
# --------------------------------------------------------------------------------------------------


class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, num_layers=2, dropout=0.3, bidirectional=True, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(12, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(self.drop(out)).sum(1) + h.sum(0).sum(-1, keepdim=True)


class GRUModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 5, num_layers=3, dropout=0.4)
        self.cell = nn.LSTMCell(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x, lengths):
        out, _ = self.rnn(x.transpose(0, 1))
        state = None
        for t in range(out.shape[0]):
            state = self.cell(nn.functional.dropout(out[t], 0.1, self.training), state)
        return self.head(state[0])


class AttnModel(nn.Module):
    """An encoder layer inside an ``nn.TransformerEncoder`` (recorded from the encoder in eval mode, so its
    fused fast path stays on) followed by a plain ``nn.MultiheadAttention``."""

    nested = False

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.3, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=self.nested)
        self.mha = nn.MultiheadAttention(4, 2, dropout=0.5, add_bias_kv=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x, lengths):
        kpm = torch.arange(x.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
        h = self.enc(x, src_key_padding_mask=kpm)
        q = h.transpose(0, 1)
        out, _ = self.mha(q, q, q, key_padding_mask=kpm)
        return self.head(out.sum(0))


class NestedAttnModel(AttnModel):
    """The same with ``enable_nested_tensor``: eval + no autograd runs the encoder on nested tensors."""

    nested = True


MODELS = {"lstm": LSTMModel, "gru": GRUModel, "attention": AttnModel, "attention_nested": NestedAttnModel}
# modules each model must have recorded whatever the mode
EXPECTED = {
    "lstm": {"rnn"},
    "gru": {"rnn", "cell"},
    "attention": {"enc.layers.0.self_attn", "mha"},
    "attention_nested": {"enc.layers.0.self_attn", "mha"},
}
# PyTorch's nested-tensor path warns once per process that nested tensors are a prototype
NESTED_PROTOTYPE = "ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning"


def _inputs():
    g = torch.Generator().manual_seed(77)
    x = torch.randn(4, 6, 4, generator=g)
    lengths = torch.tensor([6, 2, 5, 3])
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = 0
    return x, lengths


def _seed_all(seed=1234):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _same_rng(a, b):
    assert torch.equal(a[0], b[0]), "torch RNG state changed"
    na, nb = a[1], b[1]
    assert na[0] == nb[0] and np.array_equal(na[1], nb[1]) and na[2:] == nb[2:], "numpy RNG state changed"
    assert a[2] == b[2], "python RNG state changed"


def _train_step(name, probe_kw=None, record_kw=None, training=True, grad_ctx=None):
    torch.manual_seed(0)
    model = MODELS[name]().train(training)
    x, lengths = _inputs()
    _seed_all()
    probe_ctx = Probe(model, **(probe_kw or {})).record(**(record_kw or {})) if probe_kw is not None else None
    with probe_ctx if probe_ctx is not None else contextlib.nullcontext() as rec:
        with grad_ctx() if grad_ctx is not None else contextlib.nullcontext():
            out = model(x, lengths)
        if out.requires_grad:
            (out.square().mean() * 3.0).backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return out.detach().clone(), grads, _rng_states(), rec, model


# --------------------------------------------------------------------------------------------------
# bit-identical results
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("record_kw", [{}, {"max_samples": 2, "grad_scale": 3.0}], ids=["plain", "options"])
def test_outputs_grads_and_rng_are_bit_identical(name, training, record_kw):
    out0, grads0, rng0, _, _ = _train_step(name, training=training)
    out1, grads1, rng1, rec, _ = _train_step(name, probe_kw={}, record_kw=record_kw, training=training)
    assert torch.equal(out0, out1)
    assert grads0.keys() == grads1.keys()
    for k in grads0:
        assert torch.equal(grads0[k], grads1[k]), k
    _same_rng(rng0, rng1)
    assert set(rec) == EXPECTED[name]
    assert not rec.errors


@pytest.mark.filterwarnings(NESTED_PROTOTYPE)
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_outputs_identical_without_autograd(name, mode):
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    out0, _, rng0, _, _ = _train_step(name, training=False, grad_ctx=ctx)
    out1, _, rng1, rec, _ = _train_step(name, probe_kw={}, training=False, grad_ctx=ctx)
    assert torch.equal(out0, out1)
    _same_rng(rng0, rng1)
    assert set(rec) == EXPECTED[name]
    assert not rec.errors


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("container", ["standalone", "encoder"])
def test_encoder_layer_fast_path_output_unchanged(container, mode):
    """Any hook on a TransformerEncoderLayer or its children switches PyTorch off its fused fast path; the
    user's output must nevertheless be bit-identical to the run without the probe. Inside an
    ``nn.TransformerEncoder`` the layer is still recorded; a standalone one is left alone, with a warning."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = layer if container == "standalone" else nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model.eval()
    x = torch.randn(3, 5, 8)
    kpm = torch.arange(5).unsqueeze(0) >= torch.tensor([[5], [3], [4]])
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        plain = model(x, src_key_padding_mask=kpm)
    if container == "standalone":
        with pytest.warns(RNNVizWarning, match="standalone"):
            with Probe(model).record() as rec:
                with ctx():
                    probed = model(x, src_key_padding_mask=kpm)
        assert "self_attn" not in rec and "self_attn" in rec.errors
    else:
        with Probe(model).record() as rec:
            with ctx():
                probed = model(x, src_key_padding_mask=kpm)
        assert set(rec) == {"layers.0.self_attn", "layers.1.self_attn"}
    assert torch.equal(plain, probed)
    _assert_no_hooks(model)


def test_record_does_not_touch_rng():
    torch.manual_seed(0)
    model = LSTMModel().eval()
    x, lengths = _inputs()
    _seed_all(99)
    before = _rng_states()
    with Probe(model).record(max_samples=3):
        model(x, lengths).sum().backward()
    _same_rng(before, _rng_states())


# --------------------------------------------------------------------------------------------------
# nothing left behind, nothing switched
# --------------------------------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _assert_no_hooks(model: nn.Module):
    for mname, module in model.named_modules():
        for attr in _HOOK_DICTS:
            d = getattr(module, attr, None)
            assert not d, f"{mname or '<root>'}.{attr} left: {d}"
        for pname, p in module.named_parameters(recurse=False):
            assert not getattr(p, "_backward_hooks", None), f"{mname}.{pname} tensor hook left"
            assert not getattr(p, "_post_accumulate_grad_hooks", None), f"{mname}.{pname} post-acc hook left"
    from torch.nn.modules import module as mod

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called"):
        assert not getattr(mod, attr, {}), f"global {attr} left"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_hooks_left_and_modes_unchanged(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()
    model.head.eval()  # a mixed tree: each module's own flag must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    x, lengths = _inputs()
    _assert_no_hooks(model)
    probe = Probe(model)
    _assert_no_hooks(model)  # constructing a probe attaches nothing
    with probe.record() as rec:
        assert {n: m.training for n, m in model.named_modules()} == modes
        model(x, lengths).sum().backward()
        assert {n: m.training for n, m in model.named_modules()} == modes
    _assert_no_hooks(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert len(rec) > 0


def test_no_hooks_left_after_an_exception_in_the_block():
    torch.manual_seed(0)
    model = LSTMModel()
    x, lengths = _inputs()
    with pytest.raises(KeyError, match="user error"):
        with Probe(model).record():
            model(x, lengths)
            raise KeyError("user error")
    _assert_no_hooks(model)


@pytest.mark.parametrize("outer", ["enabled", "no_grad", "inference_mode"])
def test_grad_mode_unchanged(outer):
    torch.manual_seed(0)
    model = GRUModel()
    x, lengths = _inputs()
    ctx = {
        "enabled": contextlib.nullcontext,
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
    }
    with ctx[outer]():
        before = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        with Probe(model).record():
            assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == before
            out = model(x, lengths)
            assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == before
            assert out.requires_grad == (outer == "enabled")
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == before


def test_recording_is_frozen_after_the_block():
    """Hooks exist only inside the block: later passes change neither the recording nor the model's hooks."""
    torch.manual_seed(0)
    model = LSTMModel().eval()
    x, lengths = _inputs()
    probe = Probe(model)
    with probe.record() as rec:
        assert len(rec) == 0  # empty inside the block
        model(x, lengths).sum().backward()
    r = rec["rnn"]
    assert isinstance(r, RNNRecord)
    snapshot = (r.hidden.clone(), r.hidden_grad.clone())
    for t in [r.hidden, r.hidden_grad, r.cell, r.cell_grad, *r.gates.values()]:
        assert not t.requires_grad and t.grad_fn is None
    model(2 * x, lengths).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(r.hidden, snapshot[0]) and torch.equal(r.hidden_grad, snapshot[1])
    # a second block with the same probe gives a fresh, independent recording
    with probe.record() as rec2:
        model(x, lengths)
    assert rec2["rnn"].hidden_grad is None
    assert not torch.equal(rec2["rnn"].hidden, snapshot[0])
    assert rec["rnn"].hidden_grad is not None


# --------------------------------------------------------------------------------------------------
# failures in capture: strict and lenient
# --------------------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


class AddAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, q, k):
        w = torch.softmax(self.proj(q) @ k.transpose(1, 2), dim=-1)
        return w @ k, w


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.attn = AddAttn()

    def forward(self, x, lengths=None):
        h, _ = self.rnn(x)
        ctx, _ = self.attn(h, h)
        return ctx.sum(1)


def _bad_extractor(module, args, output):
    raise Boom("extractor exploded")


def _grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_lenient_mode_warns_drops_record_and_keeps_training():
    x, _ = _inputs()
    torch.manual_seed(0)
    plain = WithCustom()
    plain(x).square().sum().backward()
    torch.manual_seed(0)
    model = WithCustom()
    with pytest.warns(Warning, match="attn"):
        with Probe(model, attention={"attn": _bad_extractor}, strict=False).record() as rec:
            out = model(x)
            out.square().sum().backward()
    assert "attn" not in rec
    assert "attn" in rec.errors
    with pytest.raises(KeyError, match="attn"):
        rec["attn"]
    assert "rnn" in rec and rec["rnn"].hidden_grad is not None  # the other modules still recorded
    g0, g1 = _grads_of(plain), _grads_of(model)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    _assert_no_hooks(model)


def test_strict_mode_raises():
    x, _ = _inputs()
    torch.manual_seed(0)
    model = WithCustom()
    with pytest.raises(Exception) as info:
        with Probe(model, attention={"attn": _bad_extractor}, strict=True).record():
            model(x).sum().backward()
    chain, err = [], info.value
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, Boom) for e in chain), chain
    _assert_no_hooks(model)


# --------------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------------


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.rnn = nn.LSTM(3, 4)
        self.decoder = nn.Module()
        self.decoder.gru = nn.GRU(4, 4)
        self.decoder.out = nn.Linear(4, 2)


def _construct_and_enter(*args, **kwargs):
    probe = Probe(*args, **kwargs)
    with probe.record():
        pass


def test_unknown_module_name_lists_available():
    model = Named()
    with pytest.raises(ValueError, match=r"encoder\.rnn") as info:
        _construct_and_enter(model, modules=["encoder.lstm"])
    assert "decoder.gru" in str(info.value)
    assert "encoder.lstm" in str(info.value)


def test_unknown_attention_name_raises():
    model = Named()
    with pytest.raises(ValueError, match=r"decoder\.attn"):
        _construct_and_enter(model, attention={"decoder.attn": _bad_extractor})


def test_model_without_supported_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError) as info:
        _construct_and_enter(model)
    msg = str(info.value)
    for t in ("LSTM", "GRU", "RNN", "MultiheadAttention"):
        assert t in msg, msg
