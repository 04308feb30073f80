"""Variable-length batches: the gradient-norm curve lines sequences up where the gradient enters them.

A many-to-one loss on lengths 10/20/25 enters each sequence at its own last step: averaged at ``t``, the
curve would show a sawtooth of sequence ends (steps 9, 19, 24) while each sequence decays smoothly. Lined up
at their ends, column ``T_max - 1 - d`` is the mean over the sequences longer than ``d`` of ``||dL/dh||`` ``d``
steps before their end, computed here from the float64 step-by-step reference, one sequence at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_rnnviz import Probe
from lightning_rnnviz.render.gradients import decay_curves, reduce_grad_norm
from tests.helpers.reference import reference_rnn

LENGTHS = torch.tensor([10, 20, 25])


def _recorded(loss: str, lengths=LENGTHS):
    torch.manual_seed(0)
    module = nn.RNN(2, 6, batch_first=True)
    x = torch.randn(len(lengths), int(lengths.max()), 2)
    with Probe(module, strict=True).record() as rec:
        out, h_n = module(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        (h_n[-1].sum() if loss == "last" else out.data.pow(2).sum()).backward()
    ref = reference_rnn(module, x, lengths)
    (ref.h_n[-1].sum() if loss == "last" else ref.output.pow(2).sum()).backward()
    return rec[""], ref


def test_many_to_one_is_lined_up_at_the_ends_against_the_reference():
    record, ref = _recorded("last")
    assert record.grad_alignment == "end"
    grads = ref.hidden_grad()[0]  # (B, T, H)
    longest = int(LENGTHS.max())
    expected = []
    for column in range(longest):
        back = longest - 1 - column
        norms = [math.sqrt(float((grads[b, int(n) - 1 - back] ** 2).sum())) for b, n in enumerate(LENGTHS)
                 if int(n) > back]
        expected.append(sum(norms) / len(norms))
    np.testing.assert_allclose(record.grad_norm[0, :longest].numpy(), expected, rtol=1e-4)
    curve = np.log10(record.grad_norm[0, :longest].numpy())
    assert (np.diff(curve) > 0).all()  # no sawtooth: it rises steadily towards the end
    start_aligned = np.log10(ref.grad_norm()[0].numpy())
    assert (np.diff(start_aligned) < 0).any()  # the reference averaged at t does have the sawtooth
    payload = reduce_grad_norm(record)
    assert payload["alignment"] == "end"
    assert payload["context"] == ("sequences lined up at their last steps, where the gradient enters each alike",)


@pytest.mark.parametrize("lengths", [LENGTHS, torch.tensor([25, 25, 25])])
def test_a_loss_at_every_step_or_equal_lengths_keep_steps_from_the_start(lengths):
    record, ref = _recorded("every" if lengths[0] != 25 else "last", lengths)
    assert record.grad_alignment == "start"
    np.testing.assert_allclose(record.grad_norm[0].numpy(), ref.grad_norm()[0].numpy(), rtol=1e-4)
    assert reduce_grad_norm(record)["alignment"] == "start"


def test_end_aligned_epochs_of_different_lengths_end_together():
    history = {0: np.array([[1.0, 2.0, 3.0]]), 1: np.array([[5.0, 6.0]])}
    _, curves, _, _ = decay_curves(history, ["layer 0"], alignment="end")
    np.testing.assert_array_equal(curves[1], [[np.nan, 5.0, 6.0]])
    _, curves, _, _ = decay_curves(history, ["layer 0"])
    np.testing.assert_array_equal(curves[1], [[5.0, 6.0]])
