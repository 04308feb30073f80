"""Fused modules whose subclass packs inside its own ``forward``, and "exact" only when checked.

pytorch-forecasting's ``LSTM``/``GRU`` take ``forward(x, hx=None, lengths=None, enforce_sorted=True)``:
they pack the padded input with ``lengths`` (a length of 0 as one step), call the fused kernel on the
packed sequence and pad the output again, so a hook on the module's ``__call__`` sees the padded input and
no packing. The records must follow the lengths the module really used, and every fused record must say
``exact`` only when the replay reproduced what the call returned.

The reference (``tests/helpers/reference.py``) unrolls each sequence to its own length in float64; with
inter-layer dropout it takes the masks the kernel drew, from the generator state the test's own pre-hook
took, laid out as the module packed them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_rnnviz import Probe
from lightning_rnnviz.probe.replay import largest_relative_error, relative_error
from tests.helpers.checks import assert_matches
from tests.helpers.reference import batch_first_masks, cpu_dropout_masks, reference_rnn


class PackingLSTM(nn.LSTM):
    """A user's own subclass that packs under a keyword the probe does not know (``seq_len``)."""

    def forward(self, x, hx=None, seq_len=None):  # noqa: D102
        if seq_len is None:
            return super().forward(x, hx)
        packed = pack_padded_sequence(x, seq_len.cpu(), batch_first=self.batch_first, enforce_sorted=False)
        out, state = super().forward(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=self.batch_first, total_length=x.shape[1])
        return out, state


class DoublingGRU(nn.GRU):
    """A subclass that feeds the kernel something else than its hooks see."""

    def forward(self, x, hx=None):  # noqa: D102
        return super().forward(2 * x, hx)


def _library_modules():
    rnn = pytest.importorskip("pytorch_forecasting.models.nn.rnn")
    return {"LSTM": rnn.LSTM, "GRU": rnn.GRU}


def _masks(state, module, lengths, x):
    """The kernel's inter-layer masks, batch-first padded, from the generator state before the call."""
    stepped = lengths.clamp(min=1)
    packed = pack_padded_sequence(x, stepped, batch_first=True, enforce_sorted=False)
    dirs = 2 if module.bidirectional else 1
    masks = cpu_dropout_masks(state, module.num_layers, (packed.data.shape[0], dirs * module.hidden_size),
                              module.dropout)
    return batch_first_masks(masks, packed, x.shape[1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("loss_on", ["h_n", "output"])
def test_library_module_follows_its_lengths(kind, dropout, loss_on):
    """The issue's case: lengths [24, 12, 20, 6], a loss on ``h_n[-1]``: the sequence of 12 steps peaks at
    step 11, not 23, and the record is exact and equal to the reference, with and without dropout."""
    cls = _library_modules()[kind]
    torch.manual_seed(0)
    module = cls(input_size=3, hidden_size=5, num_layers=2, batch_first=True, dropout=dropout).train()
    x = torch.randn(4, 24, 3)
    lengths = torch.tensor([24, 12, 20, 6])
    states = []
    handle = module.register_forward_pre_hook(lambda m, a: states.append(torch.get_rng_state()))
    with Probe(module, strict=True).record() as rec:
        out, hidden = module(x, lengths=lengths, enforce_sorted=False)
        h_n = hidden[0] if kind == "LSTM" else hidden
        loss = h_n[-1].pow(2).sum() if loss_on == "h_n" else out.pow(2).sum()
        loss.backward()
    handle.remove()
    r = rec[""]
    assert r.exact and r.notes == ()
    assert r.lengths.tolist() == [24, 12, 20, 6]
    masks = _masks(states[0], module, lengths, x) if dropout else None
    ref = reference_rnn(module, x, lengths, dropout_masks=masks)
    # the reference reproduces the module's own output and state first
    torch.testing.assert_close(ref.output[:, : out.shape[1]].float(), out.detach(), rtol=1e-5, atol=1e-6)
    ref_h_n = ref.h_n if kind == "GRU" else ref.h_n
    ref_loss = ref_h_n[-1].pow(2).sum() if loss_on == "h_n" else ref.output.pow(2).sum()
    ref_loss.backward()
    assert_matches(r, ref)
    if loss_on == "h_n":
        top = r.grad_norm[-1]
        assert int(top[:12].argmax()) == 11  # where the 12-step sequence ends (mean over valid sequences)
        assert float(r.hidden_grad[-1, 1, 12:].abs().max()) == 0.0  # nothing past that sequence's end


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_sequences_of_length_zero(kind):
    """pytorch-forecasting returns the initial state for a sequence of length 0 and runs the kernel one step
    on it: the record gives it length 0 and no gradient from ``h_n``, the others exactly."""
    cls = _library_modules()[kind]
    torch.manual_seed(1)
    module = cls(input_size=3, hidden_size=4, num_layers=1, batch_first=True)
    x = torch.randn(3, 7, 3)
    lengths = torch.tensor([7, 0, 4])
    with Probe(module, strict=True).record() as rec:
        out, hidden = module(x, lengths=lengths, enforce_sorted=False)
        h_n = hidden[0] if kind == "LSTM" else hidden
        h_n[-1].sum().backward()
    r = rec[""]
    assert r.exact, r.notes
    assert r.lengths.tolist() == [7, 0, 4]
    assert float(r.hidden_grad[0, 1].abs().max()) == 0.0
    kept = torch.tensor([0, 2])
    ref = reference_rnn(module, x[kept], lengths[kept])
    (ref.h_n[-1].sum()).backward()
    torch.testing.assert_close(r.hidden_grad[:, kept].double(), ref.hidden_grad(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r.hidden[:, kept].double(), ref.hidden(), rtol=1e-5, atol=1e-6)


def test_unknown_packing_keyword_is_never_exact():
    """A subclass that packs under its own keyword: the lengths stay unknown, and the check against what
    the call returned marks the record not exact, saying what differed."""
    torch.manual_seed(2)
    module = PackingLSTM(input_size=3, hidden_size=5, num_layers=2, batch_first=True)
    x = torch.randn(4, 10, 3)
    with Probe(module, strict=True).record() as rec:
        out, (h_n, _) = module(x, seq_len=torch.tensor([10, 3, 7, 5]))
        h_n[-1].sum().backward()
    r = rec[""]
    assert not r.exact
    assert "`h_n`" in r.notes[0] and "not exact" in r.notes[0] and "float32" in r.notes[0]


def test_subclass_that_changes_its_input_is_never_exact():
    """A one-layer module whose output is taken as the top layer's states as it returned them: their own
    recurrence on the input the hook saw does not give them, and the record says so."""
    torch.manual_seed(3)
    module = DoublingGRU(input_size=3, hidden_size=5, batch_first=True)
    with Probe(module, strict=True).record() as rec:
        out, h_n = module(torch.randn(2, 6, 3))
        out.sum().backward()
    r = rec[""]
    assert not r.exact and "its output" in r.notes[0]


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_plain_modules_are_checked_and_exact(kind):
    """The check itself does not cry wolf: plain modules, padded and packed, bidirectional, float32 and
    float64, come out exact (a wrong record is exercised by the two tests above)."""
    torch.manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        module = kind(input_size=3, hidden_size=6, num_layers=2, bidirectional=True).to(dtype)
        x = torch.randn(9, 3, 3, dtype=dtype)
        packed = pack_padded_sequence(x, torch.tensor([9, 5, 2]), enforce_sorted=False)
        for inp in (x, packed):
            with Probe(module, strict=True).record() as rec:
                out, hidden = module(inp)
                h_n = hidden[0] if isinstance(hidden, tuple) else hidden
                h_n.sum().backward()
            assert rec[""].exact, (dtype, type(inp).__name__, rec[""].notes)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_handed_off_capture_draws_the_packed_masks(kind):
    """Through the worker's route (``capture()``, ``hand_off()``, ``finish()``), the dropout masks are drawn
    on the training thread in the packed layout the module used, and the record equals ``record()``'s."""
    cls = _library_modules()[kind]
    torch.manual_seed(5)
    module = cls(input_size=3, hidden_size=5, num_layers=2, batch_first=True, dropout=0.1).train()
    x, lengths = torch.randn(4, 9, 3), torch.tensor([9, 0, 4, 6])
    records = []
    for route in ("record", "hand_off"):
        torch.manual_seed(6)
        probe = Probe(module, strict=True)
        if route == "record":
            with probe.record() as rec:
                out, _ = module(x, lengths=lengths, enforce_sorted=False)
                out.sum().backward()
        else:
            with probe.capture() as captured:
                out, _ = module(x, lengths=lengths, enforce_sorted=False)
                out.sum().backward()
            captured.hand_off()
            rec = captured.finish()
        records.append(rec[""])
    assert all(r.exact for r in records), [r.notes for r in records]
    torch.testing.assert_close(records[0].hidden_grad, records[1].hidden_grad, rtol=0, atol=0)


class _Doubled(torch.autograd.Function):
    """The identity forward, twice the gradient backward."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return 2 * grad


class GradientBendingLSTM(nn.LSTM):
    """A subclass whose forward returns what the kernel returned, but whose backward does not pass on the
    gradient its output receives: only the gradient of its input can tell."""

    def forward(self, x, hx=None):  # noqa: D102
        if isinstance(x, torch.nn.utils.rnn.PackedSequence):
            return super().forward(x._replace(data=_Doubled.apply(x.data)), hx)
        return super().forward(_Doubled.apply(x), hx)


@pytest.mark.parametrize("packed", [False, True])
def test_the_input_gradient_is_checked(packed):
    """Where the input requires a gradient, the replay's dL/dx is compared with what autograd delivered to
    the input through the call: equal for the plain module (padded, packed, a library subclass), and a
    subclass that bends the gradient on its way back is not exact, though its forward is reproduced."""
    torch.manual_seed(7)
    x = torch.randn(3, 8, 4)
    lengths = torch.tensor([8, 3, 5])

    def run(module):
        inp = x.clone().requires_grad_()
        feed = pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False) if packed else inp
        with Probe(module, strict=True).record() as rec:
            out, (h_n, _) = module(feed)
            out_t = out.data if packed else out
            (out_t.pow(2).sum() + h_n.sum()).backward()
        return rec[""]

    plain = run(nn.LSTM(4, 5, num_layers=2, batch_first=True))
    assert plain.exact, plain.notes
    bent = run(GradientBendingLSTM(4, 5, num_layers=2, batch_first=True))
    assert not bent.exact and "the gradient of its input" in bent.notes[0]
    assert "its output" not in bent.notes[0] and "`h_n`" not in bent.notes[0]


def test_the_input_gradient_of_a_library_module_with_lengths_is_checked():
    cls = _library_modules()["GRU"]
    torch.manual_seed(8)
    module = cls(input_size=3, hidden_size=4, num_layers=2, batch_first=True, dropout=0.2).train()
    x = torch.randn(4, 10, 3, requires_grad=True)
    with Probe(module, strict=True).record() as rec:
        out, h_n = module(x, lengths=torch.tensor([10, 0, 4, 7]), enforce_sorted=False)
        (out.pow(2).sum() + h_n.sum()).backward()
    r = rec[""]
    assert r.exact, r.notes
    assert r.lengths.tolist() == [10, 0, 4, 7]


def test_a_long_packed_sequence_on_the_cpu_is_not_walked(monkeypatch):
    """PyTorch runs a packed sequence on the CPU as steps, some 18 autograd nodes a step, layer and
    direction: past 2,048 such nodes the input gradient is not caught (no walk at all on the training
    thread), and the record rests on the forward's check."""
    import lightning_rnnviz.probe.capture as capture_module

    walks = []
    real = capture_module._edges_into
    monkeypatch.setattr(capture_module, "_edges_into", lambda *a: walks.append(1) or real(*a))
    torch.manual_seed(9)
    module = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    for steps, walked in ((20, 1), (40, 0)):
        walks.clear()
        x = torch.randn(steps, 2, 3, requires_grad=True)
        with Probe(module, strict=True).record() as rec:
            out, _ = module(pack_padded_sequence(x, torch.tensor([steps, 5])))
            out.data.sum().backward()
        assert rec[""].exact and len(walks) == walked


@pytest.mark.parametrize("special", ["none", "inf_in_a", "equal_infs", "both_nan", "nan_in_b", "inf_in_b",
                                     "opposite_infs", "masked_nan"])
def test_the_largest_relative_error_treats_special_values_as_the_elementwise_error_does(special):
    """The step check takes the largest error without building :func:`relative_error` whole; what it
    gives must be what that function's largest value is: 0 where both are NaN or equal infinities, the
    largest float where only the replayed value is infinite, infinite where only one is NaN or only the
    given value is infinite (or they are opposite infinities), and nothing from a step left out."""
    inf, nan = float("inf"), float("nan")
    torch.manual_seed(11)
    a, b = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
    a[2, 1] = b[2, 1] + 1e-3  # a finite error to find among the rest
    keep = torch.ones(6, 3, 1, dtype=torch.bool)
    keep[5] = False
    at = (1, 0, 2)
    if special == "inf_in_a":
        a[at] = inf
    elif special == "equal_infs":
        a[at] = b[at] = -inf
    elif special == "both_nan":
        a[at] = b[at] = nan
    elif special == "nan_in_b":
        b[at] = nan
    elif special == "inf_in_b":
        b[at] = inf
    elif special == "opposite_infs":
        a[at], b[at] = inf, -inf
    elif special == "masked_nan":
        a[5, 2, 0] = nan
    expected = relative_error(a, b).masked_fill_(~keep, 0).amax()
    got = largest_relative_error(a, b, keep)
    assert got.shape == () and torch.equal(got, expected), (got, expected)
    assert torch.equal(largest_relative_error(a, b), relative_error(a, b).amax())
    assert largest_relative_error(a[:0], b[:0]).item() == 0
