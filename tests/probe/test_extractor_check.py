"""What a custom attention extractor returns is checked before it becomes a record."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from lightning_rnnviz import Probe, RNNVizWarning


class Dot(nn.Module):
    """Dot-product attention of ``T_q`` queries over ``T_k`` keys; returns ``(context, weights)``."""

    def forward(self, q, k, mask=None):
        scores = q @ k.transpose(1, 2)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return weights @ k, weights


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Dot()
        self.rnn = nn.GRU(64, 4, batch_first=True)

    def forward(self, q, k, mask=None, calls=1):
        outs = [self.attn(q, k, mask)[0] for _ in range(calls)]
        return self.rnn(torch.cat(outs, 1))[0].sum()


def context_of(module, args, output):
    return output[0]  # the context vector (B, T_q, 64), not the weights


def relu_context_of(module, args, output):
    return output[0].relu()  # non-negative, but still no weights


def transposed(module, args, output):
    return output[1].transpose(1, 2)


def negated(module, args, output):
    return output[1] - output[1].mean(-1, keepdim=True)  # rows sum to 0, some entries negative


def weights_of(module, args, output):
    return output[1]


def _inputs(tq=1, tk=7, batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, tq, 64, generator=g), torch.randn(batch, tk, 64, generator=g)


@pytest.mark.parametrize(("extractor", "tq", "shape", "problem"), [
    (context_of, 1, "(2, 1, 64)", "negative values"),
    (relu_context_of, 1, "(2, 1, 64)", "rows along the last axis sum to"),
    (transposed, 3, "(2, 7, 3)", "rows along the last axis sum to"),
    (negated, 3, "(2, 3, 7)", "negative values"),
])
def test_an_extractor_that_returns_no_weights_is_rejected(extractor, tq, shape, problem):
    torch.manual_seed(0)
    model = Model()
    q, k = _inputs(tq=tq)
    probe = Probe(model, attention={"attn": extractor})
    message = (r"could not capture module 'attn' \(ValueError: "
               rf"the attention extractor `{extractor.__qualname__}` "
               rf"returned shape {re.escape(shape)} for module 'attn', .*{problem}.*"
               r"expected non-negative weights \(batch, \[heads,\] T_out, T_in\)")
    with pytest.warns(RNNVizWarning, match=message):
        with probe.record() as rec:
            model(q, k).backward()
    assert "attn" not in rec and "attn" in rec.errors
    assert "rnn" in rec  # the other modules are still recorded
    assert probe.error_counts["attn"] == 1
    # one warning per probe; each failing block is counted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with probe.record() as rec:
            model(q, k).backward()
    assert "attn" not in rec and probe.error_counts["attn"] == 2
    with pytest.raises(ValueError, match=rf"`{extractor.__qualname__}` returned shape"):
        with Probe(model, attention={"attn": extractor}, strict=True).record():
            model(q, k)


def test_inconsistent_calls_of_one_block_are_rejected():
    q, k = _inputs(tq=1, tk=7)
    _, k_short = _inputs(tq=1, tk=5)

    class TwoLengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Dot()

        def forward(self):
            self.attn(q, k)
            self.attn(q, k_short)

    model = TwoLengths()
    expected = r"returned shape \(2, 1, 5\) .*earlier call of this block gave batch 2, 1 head\(s\) and 7 keys"
    with pytest.warns(RNNVizWarning, match=expected):
        with Probe(model, attention={"attn": weights_of}).record() as rec:
            model()
    assert "attn" not in rec


def test_weights_pass_also_masked_multi_call_and_half_precision():
    torch.manual_seed(0)
    model = Model()
    q, k = _inputs(tq=2, tk=6)
    mask = torch.zeros(2, 2, 6, dtype=torch.bool)
    mask[0, :, 4:] = True
    mask[1, 1] = True  # a fully masked query: a NaN row, not by itself a failure
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Probe(model, attention={"attn": weights_of}, strict=True).record() as rec:
            model(q, k, mask, calls=3)
        r = rec["attn"]
        assert tuple(r.attention.shape) == (2, 1, 6, 6)
        assert torch.isnan(r.attention[1, 0, 1]).all()
        # bf16 weights: rows sum to 1 only within bf16's rounding
        half = {"attn": lambda m, a, out: out[1].to(torch.bfloat16)}
        with Probe(model, attention=half, strict=True).record() as rec:
            model(q, k)
        assert rec["attn"].attention.dtype == torch.float32


def test_not_a_tensor_or_wrong_rank_or_integer():
    model = Model()
    q, k = _inputs()
    cases = {
        "a tuple": (lambda m, a, out: out, r"returned a tuple for module 'attn'"),
        "5-D": (lambda m, a, out: out[1][None, None],
                r"returned shape \(1, 1, 2, 1, 7\) for module 'attn', 5 dimensions"),
        "integer": (lambda m, a, out: (out[1] > 0.5).long(), r"of dtype torch\.int64"),
    }
    for name, (extractor, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            with Probe(model, attention={"attn": extractor}, strict=True).record():
                model(q, k)
