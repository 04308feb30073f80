"""The references in tests/helpers must themselves agree with PyTorch before they can judge the probe.

These tests do not use lightning_rnnviz at all.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.cases import KINDS, RNNConfig, build_rnn, loss_for, make_inputs, run_rnn
from tests.helpers.reference import (
    causal_mask,
    reference_cell_loop,
    reference_mha,
    reference_rnn,
)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")

TOL = dict(rtol=1e-5, atol=1e-5)

REF_GRID = [
    RNNConfig(
        kind=k, num_layers=nl, bidirectional=bi, batch_first=bf, bias=bias, packed=pk, given_hx=hx, loss=ls
    )
    for k in KINDS
    for (nl, bi, bf, bias, pk, hx, ls) in [
        (1, False, True, True, False, False, "all"),
        (2, True, False, True, True, True, "mixed"),
        (3, True, True, False, True, False, "final"),
        (2, False, False, True, True, True, "last"),
    ]
]


@pytest.mark.parametrize("cfg", REF_GRID, ids=lambda c: c.describe())
def test_rnn_reference_matches_module_outputs_and_gradients(cfg):
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    x = inp.x.clone().requires_grad_(True)
    h0 = None if inp.h0 is None else inp.h0.clone().requires_grad_(True)
    c0 = None if inp.c0 is None else inp.c0.clone().requires_grad_(True)
    inp_grad = type(inp)(x=x, lengths=inp.lengths, h0=h0, c0=c0)
    loss_fn = loss_for(cfg, module, inp)

    out, h_n, c_n = run_rnn(module, inp_grad, cfg.packed)
    leaves = list(module.parameters()) + [x] + [t for t in (h0, c0) if t is not None]
    grads_mod = torch.autograd.grad(loss_fn(out, h_n, c_n), leaves, allow_unused=True)

    ref = reference_rnn(module, x, inp.lengths, h0, c0, through_module=True)
    torch.testing.assert_close(ref.output.float(), out.detach(), **TOL)
    torch.testing.assert_close(ref.h_n.float(), h_n.detach(), **TOL)
    if c_n is not None:
        torch.testing.assert_close(ref.c_n.float(), c_n.detach(), **TOL)
    grads_ref = torch.autograd.grad(loss_fn(ref.output, ref.h_n, ref.c_n), leaves, allow_unused=True)
    for gm, gr in zip(grads_mod, grads_ref):
        if gm is None or gr is None:  # unused on one side: the other must be all zeros
            other = gr if gm is None else gm
            assert other is None or not other.abs().any()
            continue
        torch.testing.assert_close(gr.float(), gm, rtol=1e-4, atol=2e-5)

    # the recorded top layer equals the module's output; padded steps are zero
    rows = ref.num_layers * ref.num_directions
    hid = ref.hidden()
    top = torch.cat([hid[rows - ref.num_directions + d] for d in range(ref.num_directions)], dim=-1)
    torch.testing.assert_close(top.float(), out.detach(), **TOL)
    assert not hid[:, ~ref.valid_mask()].abs().any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("given_hx", [False, True])
def test_rnn_reference_total_gradients_match_module_stepping(kind, given_hx):
    """Independent check of ``dL/dh_t``: step a 1-layer module one call per step, take grads of h_t."""
    cfg = RNNConfig(kind=kind, given_hx=given_hx, batch=2, time=4)
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    is_lstm = isinstance(module, nn.LSTM)
    h = inp.h0
    c = inp.c0
    hs, cs = [], []
    for t in range(cfg.time):
        hx = None if h is None else ((h, c) if is_lstm else h)
        _, state = module(inp.x[:, t : t + 1], hx)
        h, c = state if is_lstm else (state, None)
        h.retain_grad()
        hs.append(h)
        if is_lstm:
            c.retain_grad()
            cs.append(c)
    out = torch.stack([s[0] for s in hs], dim=1)  # (B, T, H_out) built from the states themselves
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()

    ref = reference_rnn(module, inp.x, None, inp.h0, inp.c0)
    (ref.output * w.double()).sum().backward()
    expect_h = torch.stack([s.grad[0] for s in hs], dim=1)
    torch.testing.assert_close(ref.hidden_grad()[0].float(), expect_h, rtol=1e-4, atol=1e-5)
    if is_lstm:
        # c_n of a one-step call only carries the gradient of the *future* path (c_t -> c_{t+1});
        # the total dL/dc_t adds the same-step path through h_t = o_t * tanh(c_t).
        future = torch.stack([torch.zeros_like(s[0]) if s.grad is None else s.grad[0] for s in cs], dim=1)
        o_t = ref.gates()["output"][0]
        tanh_c = torch.tanh(ref.cell()[0])
        d_m = expect_h.double()  # dL/d(o_t * tanh(c_t)), back through the projection if any
        if module.proj_size > 0:
            d_m = d_m @ module.weight_hr_l0.detach().double()
        expect_c = future.double() + d_m * o_t * (1 - tanh_c**2)
        torch.testing.assert_close(ref.cell_grad()[0], expect_c, rtol=1e-4, atol=1e-5)
        # the gates reproduce c_t and h_t
        gates = ref.gates()
        c_prev = torch.zeros_like(ref.cell()[0, :, 0]) if inp.c0 is None else inp.c0[0].double()
        c1 = gates["forget"][0, :, 0] * c_prev + gates["input"][0, :, 0] * gates["cell"][0, :, 0]
        torch.testing.assert_close(c1, ref.cell()[0, :, 0])
    # grad_norm helper agrees with a vectorised computation
    gn = ref.hidden_grad().norm(dim=-1).mean(dim=1)
    torch.testing.assert_close(ref.grad_norm(), gn)


@pytest.mark.parametrize("cell_type", ["LSTMCell", "GRUCell", "RNNCell_tanh", "RNNCell_relu"])
@pytest.mark.parametrize("given_hx", [False, True])
def test_cell_reference_matches_cell(cell_type, given_hx):
    torch.manual_seed(0)
    if cell_type == "LSTMCell":
        cell = nn.LSTMCell(3, 4)
    elif cell_type == "GRUCell":
        cell = nn.GRUCell(3, 4)
    else:
        cell = nn.RNNCell(3, 4, nonlinearity=cell_type.split("_")[1])
    xs = torch.randn(2, 5, 3)
    h0 = torch.randn(2, 4) if given_hx else None
    c0 = torch.randn(2, 4) if given_hx and cell_type == "LSTMCell" else None
    state = None if h0 is None else ((h0, c0) if c0 is not None else h0)
    outs = []
    for t in range(5):
        state = cell(xs[:, t], state)
        outs.append(state[0] if isinstance(state, tuple) else state)
    ref = reference_cell_loop(cell, xs, h0, c0)
    torch.testing.assert_close(ref.output.float(), torch.stack(outs, 1).detach(), **TOL)


def _opts_id(opts: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in opts.items()) or "default"


MHA_GRID = [
    dict(),
    dict(batch_first=True),
    dict(kdim=3, vdim=5),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
    dict(bias=False),
]


@pytest.mark.parametrize("opts", MHA_GRID, ids=_opts_id)
@pytest.mark.parametrize("masks", ["none", "kpm", "bool_mask", "float_mask", "causal", "kpm+bool", "3d"])
def test_mha_reference_matches_module_weights(opts, masks):
    torch.manual_seed(0)
    E, nh, B, Tq, Tk = 8, 2, 3, 4, 5
    mha = nn.MultiheadAttention(E, nh, **opts).eval()
    bf = opts.get("batch_first", False)
    kd, vd = opts.get("kdim", E), opts.get("vdim", E)
    q = torch.randn(B, Tq, E)
    k = torch.randn(B, Tk, kd)
    v = torch.randn(B, Tk, vd)
    kw = {}
    if "kpm" in masks:
        kw["key_padding_mask"] = torch.arange(Tk).unsqueeze(0) >= torch.tensor([[5], [3], [4]])
    if "bool" in masks:
        kw["attn_mask"] = torch.rand(Tq, Tk) > 0.7
        kw["attn_mask"][:, 0] = False
    if masks == "float_mask":
        kw["attn_mask"] = torch.randn(Tq, Tk)
    if masks == "causal":
        k, v = k[:, :Tq], v[:, :Tq]
        kw["attn_mask"] = causal_mask(Tq)
        kw["is_causal"] = True
    if masks == "3d":
        kw["attn_mask"] = torch.randn(B * nh, Tq, Tk)
    args = (q, k, v) if bf else (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    _, w = mha(*args, need_weights=True, average_attn_weights=False, **kw)
    ref = reference_mha(mha, *args, **kw)
    torch.testing.assert_close(ref.float(), w.detach(), **TOL)


def test_mha_reference_unbatched():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 3).eval()
    q, k = torch.randn(4, 6), torch.randn(5, 6)
    kpm = torch.tensor([False, False, False, True, True])
    _, w = mha(q, k, k, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    ref = reference_mha(mha, q, k, k, key_padding_mask=kpm)
    assert ref.shape == (1, 3, 4, 5)
    torch.testing.assert_close(ref[0].float(), w.detach(), **TOL)
