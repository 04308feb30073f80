"""A fused RNN called once per decoding step (one step a call, each from the previous call's state).

As in PyTorch's seq2seq tutorial, the decoder calls ``nn.GRU`` with a sequence of length 1 and carries
the hidden state; here each step's input is also computed from the previous output, so gradients reach
a state through the recurrence, through the layers above and through the next step's input. The
reference unrolls the same decoder in float64 with ``retain_grad()`` on every state.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_rnnviz import Probe, RNNVizWarning
from tests.helpers.checks import GRAD_TOL, VAL_TOL, close
from tests.helpers.reference import reference_rnn

MODULES = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}


class StepDecoder(nn.Module):
    """Calls ``self.rnn`` once per output step; the next input is ``tanh(back(output))``."""

    def __init__(self, kind: str, num_layers: int, batch_first: bool, input_size: int = 3, hidden: int = 4):
        super().__init__()
        self.rnn = MODULES[kind](input_size, hidden, num_layers=num_layers, batch_first=batch_first)
        self.back = nn.Linear(hidden, input_size)

    def forward(self, x0, hx, steps: int):
        x, outs = x0, []
        for _ in range(steps):
            step_in = x.unsqueeze(1 if self.rnn.batch_first else 0)
            out, hx = self.rnn(step_in, hx)
            out = out.squeeze(1 if self.rnn.batch_first else 0)
            outs.append(out)
            x = torch.tanh(self.back(out))
        return torch.stack(outs, 1), hx


def _loss(outs, hx, weights):
    h_n = hx[0] if isinstance(hx, tuple) else hx
    return (outs * weights[0].to(outs.dtype)).sum() + (h_n * weights[1].to(h_n.dtype)).sum()


def _reference(model: StepDecoder, x0, hx, steps, weights):
    """The decoder unrolled in float64: each step re-run by the step-by-step reference, states kept."""
    back_w, back_b = (t.detach().double() for t in (model.back.weight, model.back.bias))
    x = x0.double()
    refs, outs = [], []
    h, c = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
    h = None if h is None else h.double()
    c = None if c is None else c.double()
    for _ in range(steps):
        ref = reference_rnn(model.rnn, x.unsqueeze(1), None, h, c, through_module=True)
        refs.append(ref)
        out = ref.output[:, 0]
        outs.append(out)
        h, c = ref.h_n, ref.c_n
        x = torch.tanh(out @ back_w.T + back_b)
    _loss(torch.stack(outs, 1), h, weights).backward()
    return refs


def _stack(refs, what: str) -> torch.Tensor:
    return torch.cat([getattr(r, what)() for r in refs], dim=2)  # (layers, batch, steps, .)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("start", ["zeros", "given"])
def test_calls_of_one_step_each_are_the_time_axis(kind, num_layers, batch_first, start):
    torch.manual_seed(0)
    model = StepDecoder(kind, num_layers, batch_first)
    B, S = 3, 5
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, 3, generator=g)
    hx = None
    if start == "given":  # the first call may start from anything, e.g. an encoder's final state
        h0 = torch.randn(num_layers, B, 4, generator=g)
        hx = (h0, torch.randn(num_layers, B, 4, generator=g)) if kind == "LSTM" else h0
    weights = (torch.randn(B, S, 4, generator=g), torch.randn(num_layers, B, 4, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chain is not "several calls": no warning
        with Probe(model, strict=True).record() as rec:
            outs, last = model(x0, hx, S)
            _loss(outs, last, weights).backward()
    for p in model.parameters():
        p.grad = None
    refs = _reference(model, x0, hx, S, weights)
    r = rec["rnn"]
    assert r.exact is True and r.kind == model.rnn.mode
    assert tuple(r.hidden.shape) == (num_layers, B, S, 4)
    assert torch.equal(r.lengths, torch.full((B,), S))
    close(r.hidden, _stack(refs, "hidden"), "hidden", VAL_TOL)
    for name in refs[0].gate_names:
        got = torch.cat([ref.gates()[name] for ref in refs], dim=2)
        close(r.gates[name], got, f"gates[{name}]", VAL_TOL)
    # the total gradient of every layer's state at every step: recurrence, layers above, next input
    close(r.hidden_grad, _stack(refs, "hidden_grad"), "hidden_grad", GRAD_TOL)
    if kind == "LSTM":
        close(r.cell, _stack(refs, "cell"), "cell", VAL_TOL)
        close(r.cell_grad, _stack(refs, "cell_grad"), "cell_grad", GRAD_TOL)
    assert r.grad_norm.shape == (num_layers, S) and bool((r.grad_norm[:, 0] > 0).all())


def test_chain_with_max_samples_and_steps_without_gradient():
    torch.manual_seed(0)
    model = StepDecoder("GRU", 2, True)
    x0 = torch.randn(4, 3)
    with Probe(model).record(max_samples=2) as rec:
        outs, _ = model(x0, None, 4)
        outs[:, 1].sum().backward()  # steps 2 and 3 get no gradient at all
    r = rec["rnn"]
    assert tuple(r.hidden.shape) == (2, 2, 4, 4)
    assert not r.hidden_grad[:, :, 2:].any() and r.hidden_grad[:, :, :2].abs().sum() > 0
    full = Probe(model)
    with full.record() as rec_full:
        outs, _ = model(x0, None, 4)
        outs[:, 1].sum().backward()
    torch.testing.assert_close(r.hidden_grad, rec_full["rnn"].hidden_grad[:, :2], rtol=1e-5, atol=1e-7)


def test_chain_with_dropout_in_training_mode_is_exact():
    """Each call of a multi-layer decoder draws its own dropout masks; each is replayed from its own state."""
    torch.manual_seed(0)
    model = StepDecoder("LSTM", 2, True)
    model.rnn.dropout = 0.5
    model.train()
    with Probe(model, strict=True).record() as rec:
        outs, _ = model(torch.randn(3, 3), None, 4)
        outs.sum().backward()
    assert rec["rnn"].exact is True and rec["rnn"].hidden.shape[2] == 4


# --------------------------------------------------------------------------------------------------
# several calls that are not a chain: one warning, and `call=` chooses
# --------------------------------------------------------------------------------------------------


class Twice(nn.Module):
    """Applies one GRU to two whole sequences."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, a, b, grad_to=(0, 1)):
        outs = [self.rnn(a)[0], self.rnn(b)[0]]
        return sum(outs[i].sum() for i in grad_to)


def _twice_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 5, 3, generator=g), torch.randn(2, 6, 3, generator=g)


@pytest.mark.parametrize(("grad_to", "shown", "which"), [
    ((0, 1), 2, "the last whose output received a gradient"),
    ((0,), 1, "the last whose output received a gradient"),
])
def test_several_calls_warn_once_which_is_shown(grad_to, shown, which):
    torch.manual_seed(0)
    model = Twice()
    a, b = _twice_inputs()
    probe = Probe(model)
    message = (rf"module 'rnn' was called 2 times .* shows call {shown} of 2, {which}\. "
               r".*`Probe\(call=\.\.\.\)`")
    with pytest.warns(RNNVizWarning, match=message):
        with probe.record() as rec:
            model(a, b, grad_to).backward()
    assert rec["rnn"].time == (5, 6)[shown - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module and probe
        with probe.record():
            model(a, b, grad_to).backward()


def test_several_calls_without_gradient_show_the_last():
    model = Twice()
    a, b = _twice_inputs()
    with pytest.warns(RNNVizWarning, match=r"shows call 2 of 2, the last \(none received a gradient\)"):
        with Probe(model).record() as rec, torch.no_grad():
            model(a, b)
    assert rec["rnn"].time == 6


@pytest.mark.parametrize(("call", "length"), [(0, 5), (1, 6), (-1, 6), (-2, 5)])
def test_call_chooses_a_forward_call(call, length):
    torch.manual_seed(0)
    model = Twice()
    a, b = _twice_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chosen explicitly: nothing to warn about
        with Probe(model, call=call, strict=True).record() as rec:
            model(a, b).backward()
    r = rec["rnn"]
    assert r.time == length
    x = a if length == 5 else b
    ref = reference_rnn(model.rnn, x)
    ref.output.sum().backward()
    close(r.hidden, ref.hidden(), "hidden", VAL_TOL)
    close(r.hidden_grad, ref.hidden_grad(), "hidden_grad", GRAD_TOL)


def test_call_out_of_range_drops_the_record_with_a_warning_or_raises():
    model = Twice()
    a, b = _twice_inputs()
    probe = Probe(model, call=2)
    expected = r"could not replay module 'rnn' \(ValueError: `call`=2 is out of range"
    with pytest.warns(RNNVizWarning, match=expected):
        with probe.record() as rec:
            model(a, b).backward()
    assert "rnn" not in rec and "out of range" in rec.errors["rnn"]
    assert probe.error_counts["rnn"] == 1
    with pytest.raises(ValueError, match=r"`call`=-3 is out of range: module 'rnn' was called 2 time"):
        with Probe(model, call=-3, strict=True).record():
            model(a, b).backward()


@pytest.mark.parametrize("bad", ["last", 1.0, True])
def test_call_must_be_an_int_or_none(bad):
    with pytest.raises(ValueError, match=r"`call` must be an int .* got"):
        Probe(Twice(), call=bad)


@pytest.mark.parametrize("case", ["fresh_state", "bidirectional", "changed_state"])
def test_single_step_calls_that_are_not_a_chain_warn(case):
    """Calls of several steps that follow each other are a chain too (tests/probe/test_call_chains.py)."""
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, batch_first=True, bidirectional=case == "bidirectional")
    x = torch.randn(2, 1, 3)
    with pytest.warns(RNNVizWarning, match=r"module '' was called 3 times"):
        with Probe(rnn).record() as rec:
            h = None
            total = 0
            for _ in range(3):
                out, h = rnn(x, h)
                total = total + out.sum()
                if case == "fresh_state":
                    h = torch.zeros_like(h)
                elif case == "changed_state":
                    h = h + 1e-3
            total.backward()
    assert rec[""].time == x.shape[1]
