"""The words of the pictures' titles and axes, the same in both painters: the batch row is a "sequence",
the training step is a "train step" (never a bare "step" beside a time-step axis), a validation picture
says so, and attention axes say "query" and "key" (with "(output)"/"(input)" only across two sequences)."""

from __future__ import annotations

import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from lightning_rnnviz import Probe, render
from lightning_rnnviz.probe.records import AttentionRecord
from lightning_rnnviz.render import canvas as cv
from lightning_rnnviz.render.jobs import Job, draw
from lightning_rnnviz.render.report import Guard, Reporter
from tests.render.conftest import make_attention, make_rnn

KINDS = ("hidden", "gates", "grad_norm", "attention")


def _flat(title: str) -> str:
    """A title (without notes) as one line: a painter breaks a long one where its pieces meet ("  ·  "),
    to keep its type readable at TensorBoard's card width."""
    return title.replace("\n", "  ·  ")


def _self_attention() -> AttentionRecord:
    # an encoder's self-attention over a padded batch: as many queries as keys, a key_padding_mask
    record = make_attention(batch=2, heads=2, queries=8, keys=8, key_lengths=[8, 6])
    return AttentionRecord("encoder.self_attn", "MultiheadAttention", record.attention, record.key_lengths)


def _payload(kind: str, attention: AttentionRecord | None = None) -> dict:
    record = make_rnn(lengths=[20, 14, 9])
    if kind == "hidden":
        return render.reduce_hidden(record, 1)
    if kind == "gates":
        return render.reduce_gates(record)
    if kind == "grad_norm":
        return render.reduce_grad_norm(record)
    return render.reduce_attention(attention or make_attention(heads=2, queries=6, keys=8), 1)


@pytest.fixture
def written(monkeypatch):
    """What either painter writes as titles and axis titles: ``{"title": [...], "axes": [...]}``."""
    seen: dict[str, list[str]] = {"title": [], "axes": []}
    title_block, xlabel, ylabel = cv.title_block, cv.Panel.xlabel, cv.Panel.ylabel
    suptitle, set_xlabel, set_ylabel = Figure.suptitle, Axes.set_xlabel, Axes.set_ylabel

    def keep(key, real):
        def wrapper(owner, text, *args, **kwargs):
            seen[key].append(str(text))
            return real(owner, text, *args, **kwargs)
        return wrapper

    def block(canvas, text, *args, **kwargs):
        seen["title"].append(text)
        return title_block(canvas, text, *args, **kwargs)

    monkeypatch.setattr(cv, "title_block", block)
    monkeypatch.setattr(cv.Panel, "xlabel", keep("axes", xlabel))
    monkeypatch.setattr(cv.Panel, "ylabel", keep("axes", ylabel))
    monkeypatch.setattr(Figure, "suptitle", keep("title", suptitle))
    monkeypatch.setattr(Axes, "set_xlabel", keep("axes", set_xlabel))
    monkeypatch.setattr(Axes, "set_ylabel", keep("axes", set_ylabel))
    return seen


@pytest.mark.parametrize("renderer", ["fast", "matplotlib"])
@pytest.mark.parametrize("kind", KINDS)
def test_titles_give_the_train_step_and_say_validation(written, renderer, kind):
    draw(Job(kind, _payload(kind), f"rnnviz/{kind}/m", 120, renderer))
    draw(Job(kind, _payload(kind), f"rnnviz/val/{kind}/m", 120, renderer))
    train, validation = (_flat(title) for title in written["title"])
    assert train.endswith("  ·  train step 120"), train
    assert validation.endswith("  ·  validation at train step 120"), validation


def test_a_jobs_tag_tells_a_validation_picture():
    assert Job("hidden", {}, "rnnviz/val/hidden/rnn", 3).validation
    assert not Job("hidden", {}, "rnnviz/hidden/rnn", 3).validation


def test_compose_title_names_the_training_step():
    assert render.common.compose_title("h", {}, 7) == "h  ·  train step 7"
    assert render.common.compose_title("h", {}, 7, validation=True) == "h  ·  validation at train step 7"
    assert render.common.compose_title("h", {}, None, validation=True) == "h  ·  validation"
    assert render.common.compose_title("h", {}, None) == "h"


@pytest.mark.parametrize("renderer", ["fast", "matplotlib"])
@pytest.mark.parametrize("kind", ["hidden", "attention"])
def test_the_batch_row_is_a_sequence_in_every_title(written, renderer, kind):
    draw(Job(kind, _payload(kind), f"rnnviz/{kind}/m", 5, renderer))
    payload = _payload(kind)
    if kind == "attention":  # nothing to draw: the message names the row too
        payload = {**payload, "weights": payload["weights"][:, :0]}
    else:
        payload = {**payload, "values": payload["values"][..., :0]}
    draw(Job(kind, payload, f"rnnviz/{kind}/m", 5, renderer))
    heading = _flat(written["title"][0]).split("  ·  ")[0]
    assert heading.endswith(", sequence 1"), heading
    assert not any("sample" in title for title in written["title"])


@pytest.mark.parametrize("renderer", ["fast", "matplotlib"])
def test_self_attention_axes_are_query_and_key_of_one_sequence(written, renderer):
    draw(Job("attention", _payload("attention", _self_attention()), "rnnviz/attention/m", 5, renderer))
    assert _flat(written["title"][0]).startswith("encoder.self_attn: self-attention, sequence 1  ·  ")
    assert {text for text in written["axes"] if "step" in text} == {"query step", "key step"}


@pytest.mark.parametrize("renderer", ["fast", "matplotlib"])
def test_cross_attention_axes_name_the_output_and_the_input(written, renderer):
    draw(Job("attention", _payload("attention"), "rnnviz/attention/m", 5, renderer))
    assert _flat(written["title"][0]).startswith("decoder.attn: attention, sequence 1  ·  ")
    assert {text for text in written["axes"] if "step" in text} == {"query (output) step", "key (input) step"}


@pytest.mark.parametrize("renderer", ["fast", "matplotlib"])
def test_gradient_titles_say_time_step_beside_the_train_step(written, renderer):
    record = make_rnn(lengths=[20, 14, 9])
    draw(Job("grad_norm", _payload("grad_norm"), "rnnviz/grad_norm/m", 9, renderer))
    history = {0: record.grad_norm.numpy(), 1: record.grad_norm.numpy()}
    draw(Job("grad_decay", {"history": history, "name": "rnn", "layer_labels": ["layer 0"]}, "rnnviz/grad_decay/m",
             9, renderer))
    assert [_flat(t).split("  ·  ")[0] for t in written["title"]] == [
        "encoder.rnn: gradient norm per time step", "rnn: gradient norm per time step, by epoch"]
    assert all(_flat(t).endswith("  ·  train step 9") for t in written["title"])


class _Pictures:
    """An output that keeps the pictures' payloads by tag."""

    def __init__(self) -> None:
        self.payloads: dict = {}

    def picture(self, job) -> None:
        self.payloads[job.tag] = job.payload

    def scalars(self, values, step) -> None: ...

    def histogram(self, tag, buckets, step) -> None: ...

    def text(self, tag, markdown, step) -> None: ...

    def document(self, name, data, step) -> None: ...


@pytest.mark.parametrize("renderer", ["fast", "matplotlib"])
def test_recorded_self_and_cross_attention_of_equal_lengths_get_their_own_axes(written, renderer):
    """Unpadded, with as many queries as keys: what the call showed (``attn(x, x, x)`` or another key)
    tells self-attention (query/key of one sequence) from cross-attention (output queries, input keys)."""
    model = nn.ModuleDict({"self_attn": nn.MultiheadAttention(4, 1, batch_first=True),
                           "cross": nn.MultiheadAttention(4, 1, batch_first=True)})
    source, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with Probe(model, strict=True).record() as recording:
        mixed, _ = model["self_attn"](source, source, source)
        out, _ = model["cross"](target, mixed, mixed)
        out.sum().backward()
    pictures = _Pictures()
    Reporter(("attention",), recording.records, Guard("test", strict=True), renderer=renderer).report(
        recording, pictures, step=3)
    for tag in ("rnnviz/attention/self_attn", "rnnviz/attention/cross"):
        draw(Job("attention", pictures.payloads[tag], tag, 3, renderer))
    assert [_flat(t).split("  ·  ")[0] for t in written["title"]] == ["self_attn: self-attention, sequence 0",
                                                                "cross: attention, sequence 0"]
    axes = [text for text in written["axes"] if "step" in text]
    assert set(axes[:2]) == {"query step", "key step"}
    assert set(axes[2:]) == {"query (output) step", "key (input) step"}
