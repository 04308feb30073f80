"""Probe records of recurrent modules against the independent step-by-step reference.

Every recorded tensor (hidden states, gates, cell states and the *total* per-step gradients through
time and layers) is compared with ``tests/helpers/reference.py``, which re-runs each sequence alone
with the gate formulas written out, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_rnnviz import Probe
from lightning_rnnviz.probe.records import GRU_GATES, LSTM_GATES
from tests.helpers.cases import (
    KINDS,
    STRUCTURES,
    RNNConfig,
    RNNInputs,
    build_rnn,
    loss_for,
    make_inputs,
    run_rnn,
)
from tests.helpers.checks import GRAD_TOL, VAL_TOL, assert_matches
from tests.helpers.checks import close as _close
from tests.helpers.reference import module_kind, reference_cell_loop, reference_rnn

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _record_case(cfg: RNNConfig, loss_scale: float = 1.0, **record_kw):
    """Run the module under the probe as a user would, then the reference with the same loss."""
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    loss_fn = loss_for(cfg, module, inp)
    with Probe(module).record(**record_kw) as rec:
        out, h_n, c_n = run_rnn(module, inp, cfg.packed)
        (loss_fn(out, h_n, c_n) * loss_scale).backward()
    assert list(rec) == [""], list(rec)
    ref = reference_rnn(module, inp.x, inp.lengths, inp.h0, inp.c0)
    loss_fn(ref.output, ref.h_n, ref.c_n).backward()
    # guard against a broken test set-up: the reference reproduces what the module returned
    torch.testing.assert_close(ref.output.float(), out.detach(), **VAL_TOL)
    return rec[""], ref, module, inp


# --------------------------------------------------------------------------------------------------
# the configuration grid
# --------------------------------------------------------------------------------------------------

GRID = [
    RNNConfig(
        kind=k, num_layers=nl, bidirectional=bi, batch_first=bf, bias=b, packed=pk, given_hx=hx, loss=ls
    )
    for k in KINDS
    for (nl, bi, bf, b, pk, hx, ls) in STRUCTURES
]


@pytest.mark.parametrize("cfg", GRID, ids=lambda c: c.describe())
def test_fused_rnn_matches_reference(cfg):
    r, ref, _, _ = _record_case(cfg)
    assert_matches(r, ref)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(KINDS),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    packed=st.booleans(),
    given_hx=st.booleans(),
    loss=st.sampled_from(["all", "final", "last", "mixed"]),
    batch=st.integers(1, 4),
    time=st.integers(1, 6),
    input_size=st.integers(1, 4),
    hidden_size=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_fused_rnn_matches_reference_property(**kw):
    if kw["kind"] == "LSTM_PROJ":
        kw["proj_size"] = kw["hidden_size"] - 1
    r, ref, _, _ = _record_case(RNNConfig(**kw))
    assert_matches(r, ref)


# --------------------------------------------------------------------------------------------------
# single features
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("given_hx", [False, True])
def test_unbatched_input(kind, bidirectional, given_hx):
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=bidirectional, batch=1, given_hx=given_hx)
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    x2 = inp.x[0]  # (T, I): unbatched
    h0 = None if inp.h0 is None else inp.h0[:, 0]
    c0 = None if inp.c0 is None else inp.c0[:, 0]
    hx = None if h0 is None else ((h0, c0) if isinstance(module, nn.LSTM) else h0)
    g = torch.Generator().manual_seed(5)
    with Probe(module).record() as rec:
        out, state = module(x2, hx)
        h_n = state[0] if isinstance(module, nn.LSTM) else state
        w_out, w_h = torch.randn(out.shape, generator=g), torch.randn(h_n.shape, generator=g)
        ((out * w_out).sum() + (h_n * w_h).sum()).backward()
    assert out.dim() == 2
    ref = reference_rnn(module, inp.x, None, inp.h0, inp.c0)
    ((ref.output[0] * w_out.double()).sum() + (ref.h_n[:, 0] * w_h.double()).sum()).backward()
    r = rec[""]
    assert r.batch == 1
    assert_matches(r, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", [False, True])
def test_many_to_one_gradient_reaches_early_steps(kind, packed):
    """Loss on the last step only: the first steps still get their true, nonzero gradient."""
    cfg = RNNConfig(kind=kind, num_layers=2, loss="last", packed=packed, time=8, batch=3)
    r, ref, _, _ = _record_case(cfg)
    assert_matches(r, ref)
    for row in range(r.num_layers * r.num_directions):
        assert r.hidden_grad[row, :, 0].abs().sum() > 0, f"row {row}: zero gradient at t=0"
        assert r.grad_norm[row, 0] > 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bidirectional_reverse_direction_starts_at_each_sequence_end(kind):
    """Packed, unsorted lengths: the reverse direction's first step is each sequence's own last step."""
    cfg = RNNConfig(kind=kind, bidirectional=True, packed=True, batch=4, time=6, loss="final", seed=3)
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    inp = RNNInputs(x=inp.x, lengths=torch.tensor([2, 6, 1, 4]), h0=None, c0=None)
    for b in range(4):
        inp.x[b, int(inp.lengths[b]) :] = 0
    with Probe(module).record() as rec:
        out, h_n, c_n = run_rnn(module, inp, packed=True)
        h_n.sum().backward()
    ref = reference_rnn(module, inp.x, inp.lengths)
    ref.h_n.sum().backward()
    r = rec[""]
    assert_matches(r, ref)
    # reverse final state == reverse hidden at position 0; forward final == hidden at length-1
    for b in range(4):
        n = int(inp.lengths[b])
        torch.testing.assert_close(r.hidden[1, b, 0], h_n[1, b].detach(), **VAL_TOL)
        torch.testing.assert_close(r.hidden[0, b, n - 1], h_n[0, b].detach(), **VAL_TOL)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_sorted_enforce_sorted_true(kind):
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, batch=3, time=5, seed=8)
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    lengths = torch.tensor([5, 3, 1])
    for b in range(3):
        inp.x[b, int(lengths[b]) :] = 0
    g = torch.Generator().manual_seed(9)
    with Probe(module).record() as rec:
        packed = torch.nn.utils.rnn.pack_padded_sequence(inp.x, lengths, batch_first=True)
        out, _ = module(packed)
        w = torch.randn(out.data.shape, generator=g)
        (out.data * w).sum().backward()
    ref = reference_rnn(module, inp.x, lengths)
    ref_packed = torch.nn.utils.rnn.pack_padded_sequence(ref.output, lengths, batch_first=True)
    (ref_packed.data * w.double()).sum().backward()
    assert_matches(rec[""], ref)


# --------------------------------------------------------------------------------------------------
# cells in a Python loop
# --------------------------------------------------------------------------------------------------


class CellLoop(nn.Module):
    def __init__(self, cell_type: str, input_size: int = 3, hidden_size: int = 4):
        super().__init__()
        if cell_type == "LSTMCell":
            self.cell = nn.LSTMCell(input_size, hidden_size)
        elif cell_type == "GRUCell":
            self.cell = nn.GRUCell(input_size, hidden_size)
        else:
            self.cell = nn.RNNCell(input_size, hidden_size, nonlinearity=cell_type.split("_")[1])
        self.head = nn.Linear(hidden_size, 2)

    def forward(self, xs, state=None):
        outs, cells = [], []
        for t in range(xs.shape[1]):
            state = self.cell(xs[:, t], state)
            if isinstance(state, tuple):
                outs.append(state[0])
                cells.append(state[1])
            else:
                outs.append(state)
        return torch.stack(outs, 1), (torch.stack(cells, 1) if cells else None)


@pytest.mark.parametrize("cell_type", ["LSTMCell", "GRUCell", "RNNCell_tanh", "RNNCell_relu"])
@pytest.mark.parametrize("given_hx", [False, True])
@pytest.mark.parametrize("loss", ["all", "last"])
def test_cell_loop_matches_reference(cell_type, given_hx, loss):
    torch.manual_seed(11)
    model = CellLoop(cell_type)
    B, S = 3, 5
    g = torch.Generator().manual_seed(12)
    xs = torch.randn(B, S, 3, generator=g)
    h0 = torch.randn(B, 4, generator=g) if given_hx else None
    c0 = torch.randn(B, 4, generator=g) if given_hx and cell_type == "LSTMCell" else None
    state = None if h0 is None else ((h0, c0) if c0 is not None else h0)
    w = torch.randn(B, S, 4, generator=g)
    wc = torch.randn(B, S, 4, generator=g)

    def loss_fn(hs, cs):
        if loss == "last":
            return (hs[:, -1] * w[:, -1].to(hs.dtype)).sum()
        total = (hs * w.to(hs.dtype)).sum()
        if cs is not None:
            total = total + (cs * wc.to(cs.dtype)).sum()
        return total

    with Probe(model).record() as rec:
        hs, cs = model(xs, state)
        loss_fn(hs, cs).backward()
    assert set(rec) == {"cell"}, set(rec)
    ref = reference_cell_loop(model.cell, xs, h0, c0)
    loss_fn(ref.output, ref.cell_output).backward()
    torch.testing.assert_close(ref.output.float(), hs.detach(), **VAL_TOL)

    r = rec["cell"]
    assert r.kind == module_kind(model.cell)
    assert tuple(r.hidden.shape) == (1, B, S, 4)
    assert_matches(r, ref)
    if loss == "last":
        assert r.hidden_grad[0, :, 0].abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# record options and grad modes
# --------------------------------------------------------------------------------------------------


def test_grad_norm_definition():
    cfg = RNNConfig(kind="LSTM", num_layers=2, bidirectional=True, packed=True, batch=4, time=6, loss="mixed")
    r, ref, _, _ = _record_case(cfg)
    g = r.hidden_grad
    expected = torch.full((r.num_layers * r.num_directions, r.time), float("nan"))
    for row in range(expected.shape[0]):
        for t in range(r.time):
            norms = [
                math.sqrt(float((g[row, b, t].double() ** 2).sum()))
                for b in range(r.batch)
                if t < int(r.lengths[b])
            ]
            if norms:
                expected[row, t] = sum(norms) / len(norms)
    torch.testing.assert_close(r.grad_norm, expected, rtol=1e-5, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(r.grad_norm, ref.grad_norm().float(), equal_nan=True, **GRAD_TOL)
    # sequences past their end do not drag the mean down
    t_last = r.time - 1
    valid = [b for b in range(r.batch) if int(r.lengths[b]) > t_last]
    assert len(valid) < r.batch


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_max_samples_keeps_first_sequences(kind, packed, k):
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=packed, batch=4, time=5,
                    given_hx=True, loss="mixed", seed=21)
    full, ref, _, _ = _record_case(cfg)
    part, _, _, _ = _record_case(cfg, max_samples=k)
    keep = min(k, cfg.batch)
    assert part.batch == keep
    assert torch.equal(part.lengths, full.lengths[:keep])
    # the time axis is the batch's (the user's padded output), not re-trimmed to the kept sequences
    kept = part.lengths.tolist()
    assert part.time == full.time, f"time axis {part.time} != {full.time} (lengths kept: {kept})"
    # same values; a replay on fewer rows may round differently in the last float32 bit
    tight = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.hidden, full.hidden[:, :keep], **tight)
    torch.testing.assert_close(part.hidden_grad, full.hidden_grad[:, :keep], **tight)
    for name in full.gates:
        torch.testing.assert_close(part.gates[name], full.gates[name][:, :keep], **tight)
    if full.cell is not None:
        torch.testing.assert_close(part.cell, full.cell[:, :keep], **tight)
        torch.testing.assert_close(part.cell_grad, full.cell_grad[:, :keep], **tight)
    # and against the reference restricted to those sequences
    _close(part.hidden_grad, ref.hidden_grad()[:, :keep], "hidden_grad[:k]", GRAD_TOL)


@pytest.mark.parametrize("kind", ["number", "tensor", "callable"])
def test_grad_scale_divides_recorded_gradients(kind):
    s = 4096.0
    arg = {"number": s, "tensor": torch.tensor(s), "callable": (lambda: s)}[kind]
    cfg = RNNConfig(kind="LSTM", num_layers=2, packed=True, loss="mixed", seed=4)
    r, ref, _, _ = _record_case(cfg, loss_scale=s, grad_scale=arg)
    assert_matches(r, ref)  # ref is unscaled: r's gradients must be the unscaled ones


def test_no_backward_means_no_gradients():
    cfg = RNNConfig(kind="LSTM", num_layers=2, bidirectional=True, packed=True)
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    with Probe(module).record() as rec:
        run_rnn(module, inp, cfg.packed)
    ref = reference_rnn(module, inp.x, inp.lengths)
    assert_matches(rec[""], ref, grads=False)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_RELU"])
def test_records_without_autograd(mode, kind):
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=True, given_hx=True)
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with Probe(module).record() as rec:
        with ctx:
            run_rnn(module, inp, cfg.packed)
    assert torch.is_grad_enabled()
    ref = reference_rnn(module, inp.x, inp.lengths, inp.h0, inp.c0)
    r = rec[""]
    assert_matches(r, ref, grads=False)
    assert r.grad_enabled is False


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_eval_mode_dropout_is_exact(kind):
    cfg = RNNConfig(kind=kind, num_layers=3, bidirectional=True, dropout=0.5, packed=True, loss="mixed")
    module = build_rnn(cfg).eval()
    inp = make_inputs(cfg, module)
    loss_fn = loss_for(cfg, module, inp)
    with Probe(module).record() as rec:
        out, h_n, c_n = run_rnn(module, inp, cfg.packed)
        loss_fn(out, h_n, c_n).backward()
    ref = reference_rnn(module, inp.x, inp.lengths)
    loss_fn(ref.output, ref.h_n, ref.c_n).backward()
    assert_matches(rec[""], ref)


def test_train_mode_without_dropout_is_exact():
    cfg = RNNConfig(kind="GRU", num_layers=2, loss="all")
    module = build_rnn(cfg).train()
    assert module.training
    r, ref, _, _ = _record_case(cfg)
    assert_matches(r, ref)


# --------------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------------


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.rnn = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
        self.decoder = nn.Module()
        self.decoder.rnn = nn.GRU(8, 4, batch_first=True)
        self.decoder.cell = nn.RNNCell(4, 4)

    def forward(self, x):
        enc, _ = self.encoder.rnn(x)
        dec, h = self.decoder.rnn(enc)
        state = h[0]
        outs = []
        for t in range(dec.shape[1]):
            state = self.decoder.cell(dec[:, t], state)
            outs.append(state)
        return torch.stack(outs, 1)


@pytest.mark.parametrize(
    "modules, expected",
    [
        (None, {"encoder.rnn", "decoder.rnn", "decoder.cell"}),
        (["encoder.rnn"], {"encoder.rnn"}),
        (["decoder.*"], {"decoder.rnn", "decoder.cell"}),
        (["encoder.rnn", "decoder.c*"], {"encoder.rnn", "decoder.cell"}),
    ],
)
def test_module_selection_by_name_and_pattern(modules, expected):
    torch.manual_seed(0)
    model = Seq2Seq()
    x = torch.randn(2, 4, 3)
    with Probe(model, modules=modules).record() as rec:
        model(x).sum().backward()
    assert set(rec) == expected
    assert rec["decoder.cell" if "decoder.cell" in expected else "encoder.rnn"].hidden_grad is not None
    # the encoder record is the encoder's own, checked against the reference
    if "encoder.rnn" in expected:
        ref = reference_rnn(model.encoder.rnn, x)
        _close(rec["encoder.rnn"].hidden, ref.hidden(), "encoder hidden", VAL_TOL)


def test_gate_names():
    assert LSTM_GATES == ("input", "forget", "cell", "output")
    assert GRU_GATES == ("reset", "update", "new")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_top_layer_states_are_the_modules_own_output(kind):
    """The last layer's recorded states are the output the module returned, bit for bit (no replay)."""
    torch.manual_seed(0)
    module = getattr(nn, kind)(3, 4, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(5, 7, 3)
    with Probe(module).record() as rec:
        out, _ = module(x)
        out.sum().backward()
    hidden = rec[""].hidden  # (layers*directions, batch, time, hidden)
    assert torch.equal(torch.cat([hidden[2], hidden[3]], dim=-1), out.detach())


def test_output_changed_in_place_before_the_block_closes_is_not_trusted():
    torch.manual_seed(0)
    module = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with Probe(module).record() as rec, torch.no_grad():
        out, _ = module(x)
        expected = out.clone()
        out.mul_(0.0)  # the user reuses the output's memory before the block closes
    torch.testing.assert_close(rec[""].hidden[0], expected)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("flushing", [False, True], ids=["user-keeps-subnormals", "user-flushes"])
def test_a_gradient_vanishing_below_the_normal_floats_reads_zero_and_matches_above(kind, flushing):
    """Back through time a vanishing gradient passes float32's subnormal range (below 1.2e-38) on its way to
    zero. The CPU replay flushes it there, since every operation on subnormal operands is many times slower:
    the record holds zeros where the float64 reference is subnormal-small, matches it wherever it is well
    inside the normal range, and the thread's own flush setting is the user's again afterwards."""
    torch.manual_seed(0)
    module = getattr(nn, kind)(3, 4, batch_first=True)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.05)  # gates near 1/2: the gradient halves (or less) every step back
    x = torch.randn(2, 200, 3)
    torch.set_flush_denormal(flushing)
    try:
        with Probe(module).record() as rec:
            out, _ = module(x)
            out[:, -1].sum().backward()
        after = torch.tensor(1e-39, dtype=torch.float32).mul(1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
    assert after is flushing
    ref = reference_rnn(module, x, None)
    ref.output[:, -1].sum().backward()
    tiny = torch.finfo(torch.float32).tiny
    got, want = rec[""].hidden_grad.double(), ref.hidden_grad()
    assert not ((got != 0) & (got.abs() < tiny)).any()  # no subnormal left in the record
    assert ((want.abs() > 0) & (want.abs() < tiny / 4)).any() and (got[want.abs() < tiny / 4] == 0).all()
    # each step's gradient vector, wherever it lies well inside the normal range
    error = torch.linalg.vector_norm(got - want, dim=-1)
    size = torch.linalg.vector_norm(want, dim=-1)
    normal = size > 1e-30
    assert (normal.sum(-1) >= 15).all()
    assert (error[normal] <= 1e-4 * size[normal]).all(), (error / size)[normal].max()
