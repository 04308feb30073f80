"""Calls of one fused module in a step, each from the last one's final state, as one sequence.

DeepAR and pytorch-forecasting's RecurrentNetwork call one ``self.rnn`` twice a batch: the encoder (its
output thrown away, its final state passed on, lengths varying) and the decoder from that state. The
record lays each sequence's encoder steps and then its decoder steps on one time axis, with the total
``dL/dh_t`` through both. The reference unrolls both in float64, the decoder from the encoder's final
state on the same graph, each sequence to its own lengths.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_rnnviz import Probe
from tests.helpers.reference import reference_rnn


def _laid(enc: torch.Tensor, dec: torch.Tensor, enc_lengths, dec_lengths) -> torch.Tensor:
    """``(rows, B, T, X)`` parts laid end to end per sequence, zero past each one's end."""
    rows, batch = enc.shape[:2]
    total = int(max(int(e) + int(d) for e, d in zip(enc_lengths, dec_lengths)))
    out = torch.zeros(rows, batch, total, enc.shape[-1], dtype=enc.dtype)
    for b, (e, d) in enumerate(zip(enc_lengths.tolist(), dec_lengths.tolist())):
        out[:, b, :e] = enc[:, b, :e]
        out[:, b, e : e + d] = dec[:, b, :d]
    return out


def _chain(module, enc_x, dec_x, enc_lengths, dec_lengths, library: bool):
    if library:
        _, state = module(enc_x, lengths=enc_lengths, enforce_sorted=False)
        out, _ = module(dec_x, state, lengths=dec_lengths, enforce_sorted=False)
    else:
        _, state = module(enc_x)
        out, _ = module(dec_x, state)
    return out


@pytest.mark.parametrize("library", [False, True])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_encoder_and_decoder_calls_are_one_sequence(kind, library):
    if library:
        rnn = pytest.importorskip("pytorch_forecasting.models.nn.rnn")
        cls = getattr(rnn, kind)
        enc_lengths, dec_lengths = torch.tensor([11, 5, 8, 3]), torch.tensor([4, 4, 2, 4])
    else:
        cls = getattr(nn, kind)
        enc_lengths, dec_lengths = torch.full((4,), 11), torch.full((4,), 4)
    torch.manual_seed(0)
    module = cls(input_size=3, hidden_size=5, num_layers=2, batch_first=True)
    enc_x, dec_x = torch.randn(4, 11, 3), torch.randn(4, 4, 3)
    with Probe(module, strict=True).record() as rec:
        out = _chain(module, enc_x, dec_x, enc_lengths, dec_lengths, library)
        out.pow(2).sum().backward()
    r = rec[""]
    assert r.exact, r.notes
    assert r.calls == ((0, 1), 2)
    assert r.lengths.tolist() == (enc_lengths + dec_lengths).tolist()
    assert r.call_starts.tolist() == [[0] * 4, enc_lengths.tolist()]
    assert "calls 1-2 of 2 as one sequence" in r.context[0]

    enc_ref = reference_rnn(module, enc_x, enc_lengths)
    h0 = enc_ref.h_n
    c0 = enc_ref.c_n if kind == "LSTM" else None
    dec_ref = reference_rnn(module, dec_x, dec_lengths, h0, c0, through_module=True)
    dec_ref.output.pow(2).sum().backward()
    hidden = _laid(enc_ref.hidden(), dec_ref.hidden(), enc_lengths, dec_lengths)
    grads = _laid(enc_ref.hidden_grad(), dec_ref.hidden_grad(), enc_lengths, dec_lengths)
    torch.testing.assert_close(r.hidden.double(), hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.hidden_grad.double(), grads, rtol=1e-4, atol=1e-6)
    # the encoder's steps get their gradient, though its own output is thrown away
    assert float(r.hidden_grad[-1, 0, 0].norm()) > 0
    if kind == "LSTM":
        cells = _laid(enc_ref.cell_grad(), dec_ref.cell_grad(), enc_lengths, dec_lengths)
        torch.testing.assert_close(r.cell_grad.double(), cells, rtol=1e-4, atol=1e-6)


def test_a_call_shown_alone_says_which():
    torch.manual_seed(1)
    module = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with pytest.warns(UserWarning, match="called 2 times"), Probe(module).record() as rec:
        a, _ = module(x)
        b, _ = module(x)  # a fresh state: not a chain
        (a.sum() + b.sum()).backward()
    assert rec[""].calls == ((1,), 2) and rec[""].context == ("call 2 of 2",)
    assert rec[""].call_starts is None


def test_a_module_whose_state_starts_another_says_so():
    """TFT's encoder and decoder LSTMs: the encoder's record says where its last steps' gradient comes from."""
    torch.manual_seed(2)
    enc, dec = nn.LSTM(3, 4, batch_first=True), nn.LSTM(3, 4, batch_first=True)
    model = nn.ModuleDict({"enc": enc, "dec": dec})
    with Probe(model, strict=True).record() as rec:
        _, state = enc(torch.randn(2, 6, 3))
        out, _ = dec(torch.randn(2, 3, 3), state)
        out.sum().backward()
    assert rec["enc"].context == ("its final state starts 'dec': the gradient at its last steps comes through it",)
    assert rec["dec"].context == () and rec["enc"].exact
    assert float(rec["enc"].hidden_grad[0, :, -1].norm()) > 0


def test_the_gradient_curve_says_where_the_decoder_begins():
    rnn = pytest.importorskip("pytorch_forecasting.models.nn.rnn")
    from lightning_rnnviz.render.gradients import reduce_grad_norm

    torch.manual_seed(3)
    module = rnn.GRU(input_size=3, hidden_size=4, batch_first=True)
    with Probe(module, strict=True).record() as rec:
        out = _chain(module, torch.randn(3, 9, 3), torch.randn(3, 2, 3), torch.tensor([9, 4, 6]),
                     torch.tensor([2, 2, 2]), library=True)
        out.sum().backward()
    payload = reduce_grad_norm(rec[""])
    # the loss is on the decoder's steps: the sequences are lined up at their ends, where it is the same
    assert payload["alignment"] == "end"
    assert payload["context"][-1] == "call 2 is each sequence's last 2 steps"
    rec[""].direct_from = None  # alignment unknown: each sequence from its first step
    rec[""].derived.clear()
    payload = reduce_grad_norm(rec[""])
    assert payload["alignment"] == "start"
    assert payload["context"][-1] == "call 2 begins at steps 4-9, by sequence (each counted from its own first step)"
