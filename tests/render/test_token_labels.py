"""``labels(batch)`` per module: which tokens go on each axis of an encoder-decoder's pictures (real
recordings of small models, reported by a :class:`Reporter` as the callbacks report them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn

from lightning_rnnviz import Probe
from lightning_rnnviz.probe.records import Recording
from lightning_rnnviz.render.report import Guard, Reporter


class Pictures:
    """An output that keeps the pictures' payloads by tag."""

    def __init__(self) -> None:
        self.payloads: dict[str, Any] = {}

    def picture(self, job: Any) -> None:
        self.payloads[job.tag] = job.payload

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def histogram(self, tag: str, buckets: Callable[[], Any], step: int) -> None: ...

    def text(self, tag: str, markdown: str, step: int) -> None: ...

    def document(self, name: str, data: Mapping[str, Any], step: int) -> None: ...


def _report(recording: Recording, tokens: Any) -> dict[str, Any]:
    """Each module's token axes: ``{"hidden/<m>": time tokens, "attention/<m>": (query, key)}``."""
    out = Pictures()
    reporter = Reporter(("hidden", "attention"), recording.records, Guard("test", strict=True))
    reporter.report(recording, out, step=0, tokens=lambda: tokens)
    axes = {}
    for tag, payload in out.payloads.items():
        what = tag.removeprefix("rnnviz/")
        axes[what] = payload["labels"] if what.startswith("hidden/") else (payload["query_labels"],
                                                                           payload["key_labels"])
    return axes


def _record(model: nn.Module, run: Callable[[], torch.Tensor]) -> Recording:
    with Probe(model, strict=True).record() as recording:
        run().backward()
    return recording


class Stepwise(nn.Module):
    """An encoder-decoder whose names say nothing: a bidirectional GRU reads the source, self-attention
    mixes its states (``attn(x, x, x)``), a GRU cell writes the target one step per call from the source's
    last state, and cross-attention looks from the written steps at the source's."""

    def __init__(self) -> None:
        super().__init__()
        self.reader = nn.GRU(4, 8, batch_first=True, bidirectional=True)
        self.mix = nn.MultiheadAttention(16, 2, batch_first=True)
        self.writer = nn.GRUCell(4, 16)
        self.look = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        states, _ = self.reader(source)
        mixed, _ = self.mix(states, states, states, need_weights=False)
        h, written = mixed[:, -1], []
        for t in range(target.shape[1]):
            h = self.writer(target[:, t], h)
            written.append(h)
        looked, _ = self.look(torch.stack(written, 1), mixed, mixed)
        return looked.pow(2).sum()


@pytest.mark.parametrize(("source_len", "target_len"), [(6, 6), (7, 5)], ids=["same-length", "lengths-differ"])
def test_encoder_decoder_axes_get_the_tokens_of_their_sequence(source_len, target_len):
    """The source's tokens on the encoder's time axis and on both axes of its self-attention; the target's
    on the decoder's time axis; cross-attention: target tokens on the queries, source tokens on the keys.
    Where both sequences have one length, the decoder is known by its one call per step (not its name)."""
    torch.manual_seed(0)
    model = Stepwise()
    source, target = torch.randn(3, source_len, 4), torch.randn(3, target_len, 4)
    recording = _record(model, lambda: model(source, target))
    src = [f"s{i}" for i in range(source_len)]
    tgt = [f"t{i}" for i in range(target_len)]
    axes = _report(recording, {"input": src, "output": tgt})
    assert axes == {
        "hidden/reader": src,
        "hidden/writer": tgt,
        "attention/mix": (src, src),
        "attention/look": (tgt, src),
    }


class Chained(nn.Module):
    """An encoder GRU whose final state starts a decoder GRU run over the whole target at once, a causal
    self-attention over the decoder's states, and self-attention over the encoder's padded states."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.GRU(4, 8, batch_first=True)
        self.second = nn.GRU(4, 8, batch_first=True)
        self.causal = nn.MultiheadAttention(8, 2, batch_first=True)
        self.padded = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, source: torch.Tensor, target: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        states, last = self.first(source)
        written, _ = self.second(target, last)
        steps = written.shape[1]
        mask = torch.ones(steps, steps, dtype=torch.bool).triu(1)
        mixed, _ = self.causal(written, written, written, attn_mask=mask)
        padded, _ = self.padded(states, states, states, key_padding_mask=pad)
        return mixed.pow(2).sum() + padded.nan_to_num().pow(2).sum()


def test_final_state_causal_mask_and_padding_tell_the_sequence():
    """Same lengths, neutral names: the GRU whose final state starts the other is the encoder; the causal
    self-attention is the decoder's; a padded self-attention has its sequence's real tokens on both axes
    (its padded queries are cropped with its padded keys)."""
    torch.manual_seed(1)
    model = Chained()
    source, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    pad = torch.arange(6)[None] >= torch.tensor([[6], [4]])  # row 0: 6 real steps; row 1: 4
    recording = _record(model, lambda: model(source, target, pad))
    src, tgt = [f"s{i}" for i in range(6)], [f"t{i}" for i in range(6)]
    axes = _report(recording, {"input": src, "output": tgt})
    assert axes == {"hidden/first": src, "hidden/second": tgt, "attention/causal": (tgt, tgt),
                    "attention/padded": (src, src)}

    out = Pictures()
    reporter = Reporter(("attention",), ["padded"], Guard("test", strict=True), sample=1)
    reporter.report(recording, out, step=0, tokens=lambda: ["a", "b", "c", "d"])
    payload = out.payloads["rnnviz/attention/padded"]
    assert payload["weights"].shape[1:] == (4, 4)
    assert payload["query_labels"] == payload["key_labels"] == ["a", "b", "c", "d"]


class Named(nn.Module):
    """Two GRUs run one after the other over sequences of one length, nothing between them but names."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.names = (first, second)
        self.add_module(first, nn.GRU(4, 8, batch_first=True))
        self.add_module(second, nn.GRU(4, 8, batch_first=True))
        self.mix = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        states, _ = getattr(self, self.names[0])(source)
        written, _ = getattr(self, self.names[1])(target)
        mixed, _ = self.mix(written, states, states)
        return mixed.pow(2).sum()


def _named(first: str = "enc_rnn", second: str = "decoder") -> Recording:
    torch.manual_seed(2)
    model = Named(first, second)
    return _record(model, lambda: model(torch.randn(2, 5, 4), torch.randn(2, 5, 4)))


SRC, TGT = [f"s{i}" for i in range(5)], [f"t{i}" for i in range(5)]


def test_names_break_the_tie_and_a_mapping_overrides_the_guess():
    recording = _named()
    assert _report(recording, {"input": SRC, "output": TGT}) == {
        "hidden/enc_rnn": SRC, "hidden/decoder": TGT, "attention/mix": (TGT, SRC)}
    # nothing tells: the input tokens, as before
    assert _report(_named("one", "two"), {"input": SRC, "output": TGT})["hidden/two"] == SRC

    own = list("abcde")
    axes = _report(recording, {"input": SRC, "output": TGT, "modules": {
        "decoder": "input", "enc_rnn": own, "mix": {"query": "input", "key": None}}})
    assert axes == {"hidden/enc_rnn": own, "hidden/decoder": SRC, "attention/mix": (SRC, None)}
    axes = _report(recording, {"input": SRC, "output": TGT, "modules": {"mix": ("input", "output"),
                                                                       "decoder": None}})
    assert axes["attention/mix"] == (SRC, TGT) and axes["hidden/decoder"] is None
    assert _report(recording, {"output": TGT, "modules": {"mix": "output"}})["attention/mix"] == (TGT, TGT)


def test_the_old_forms_still_work():
    """A list, or ``{"input": ...}``: the input tokens wherever they fit; ``mix`` is cross-attention
    (``mix(written, states, states)``), whose queries no longer take the source's tokens."""
    recording = _named("one", "two")
    assert _report(recording, SRC) == {"hidden/one": SRC, "hidden/two": SRC, "attention/mix": (None, SRC)}
    assert _report(recording, {"input": SRC}) == _report(recording, SRC)


@pytest.mark.parametrize(("tokens", "match"), [
    ({"source": SRC}, r"may return the keys 'input', 'output' and 'modules', got 'source'.*'source' -> 'input'"),
    ({"input": SRC, "modules": ["decoder"]}, r"\['modules'\]` must map module names to 'input', 'output'.*got list"),
    ({"input": SRC, "modules": {"decodr": "output"}},
     r"names 'decodr', not a recorded module; use the names of `model.named_modules\(\)` among 'decoder', "),
    ({"input": SRC, "modules": {"decoder": "target"}}, r"\['decoder'\]` is 'target'; use 'input', 'output'"),
    ({"input": SRC, "modules": {"decoder": "output"}},
     r"asks for the 'output' tokens, but `labels\(batch\)` returned no 'output' list; return them, or choose 'input'"),
    ({"input": SRC, "modules": {"decoder": ["a"]}}, r"\['decoder'\]` gives 1 tokens to a time axis of 5 steps"),
    ({"input": SRC, "modules": {"mix": {"query": ["a", "b", "c"], "key": "input"}}},
     r"\['mix'\]` gives 3 tokens to a query axis of 5 steps"),
    ({"input": SRC, "modules": {"decoder": {"query": "input", "key": "input"}}},
     r"gives query and key tokens to a recurrent module; give it 'input', 'output'"),
    ({"input": SRC, "modules": {"mix": {"queries": "input"}}}, r"may have the keys 'query' and 'key', got \['queries'\]"),
    ({"input": SRC, "modules": {"mix": 3}}, r"\['mix'\]` must be 'input', 'output', a list of str or None, got int"),
])
def test_a_wrong_mapping_names_the_argument_what_is_wrong_and_the_fix(tokens, match):
    with pytest.raises(ValueError, match=match):
        _report(_named(), tokens)
