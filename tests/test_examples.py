"""The examples' --fast smoke runs: they train, and every figure kind reaches TensorBoard."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers.readme import example_runs, quick_start

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
        "ignore:.*Checkpoint directory.*",
    ),
]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _image_tags(root: Path) -> dict[str, set[str]]:
    tags = {}
    for run in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run), size_guidance={"images": 0})
        acc.Reload()
        tags[str(run.relative_to(root))] = set(acc.Tags()["images"])
    return tags


def _quick_start_args(name: str) -> list[str]:
    """The arguments README's quick start runs example ``name`` with (the test adds where it writes)."""
    return dict(example_runs())[name] + ["--save-dir"]


def test_the_quick_start_runs_both_examples_and_shows_their_logs():
    """README's quick start is what these tests run: both examples, fast, and TensorBoard over the folder
    they write to by default."""
    assert [name for name, _ in example_runs()] == ["vanishing_gradients", "seq2seq_attention"]
    assert all(args == ["--fast"] for _, args in example_runs())
    lines = quick_start()
    assert lines[0].startswith("python3 -m venv") and any(line.startswith("pip install -e .") for line in lines)
    tensorboard = next(shlex.split(line) for line in lines if line.startswith("tensorboard"))
    defaults = {name: _load(name).parse_args([]).save_dir for name, _ in example_runs()}
    assert set(defaults.values()) == {tensorboard[tensorboard.index("--logdir") + 1]} == {"lightning_logs"}


def test_vanishing_gradients_fast(tmp_path):
    results = _load("vanishing_gradients").main(_quick_start_args("vanishing_gradients") + [str(tmp_path)])
    runs = _image_tags(tmp_path)
    assert len(runs) >= 3  # one TensorBoard run per model kind
    every = set().union(*runs.values())
    assert {t.split("/")[1] for t in every} >= {"hidden", "gates", "grad_norm", "grad_decay", "val"}
    assert results["baseline_mse"] > 0
    assert all(isinstance(results[kind]["findings"], list) for kind in ("rnn", "gru", "lstm"))
    # the planted case: the vanilla RNN's vanishing gradient persists over both epochs and is reported,
    # with the advice for a vanilla RNN
    vanishing = [f for f in results["rnn"]["findings"] if f.kind == "vanishing_gradient"]
    assert vanishing and "a gated cell" in vanishing[0].message, results["rnn"]["findings"]
    with Image.open(results["compare"]) as picture:  # the offline comparison of the three runs
        assert picture.size[0] >= 800


def test_seq2seq_attention_fast(tmp_path):
    results = _load("seq2seq_attention").main(_quick_start_args("seq2seq_attention") + [str(tmp_path)])
    every = set().union(*_image_tags(tmp_path).values())
    assert "rnnviz/attention/decoder.attn" in every
    assert any(t.startswith("rnnviz/attention/") and t != "rnnviz/attention/decoder.attn" for t in every)
    assert any(t.startswith("rnnviz/val/attention/") for t in every)
    assert 0.0 <= results["greedy_token_acc"] <= 1.0
    # the explorer's probe set: every sequence's tokens, the input's on the encoder, the output's (the reversed
    # string) on the decoder's steps and the cross-attention's queries, the input's on its keys
    from lightning_rnnviz.explorer.reading import read_probe_sets
    from lightning_rnnviz.payload import unpack

    _, blobs = read_probe_sets(tmp_path)
    last = max((key for key in blobs if key[1] == "rnnviz/probe_set/val"), key=lambda key: key[2])
    header, _ = unpack(blobs[last])
    modules = {m["name"]: m for m in header["modules"]}
    assert len(header["tokens"]) == len(header["rows"]) == 8 and all(header["tokens"])
    for k, source in enumerate(header["tokens"]):
        target = modules["decoder.cell"]["tokens"][k]
        assert target == source[::-1] and target != source
        assert modules["decoder.attn"]["query_tokens"][k] == target
        assert modules["decoder.attn"]["key_tokens"][k] == source
    assert modules["decoder.attn"]["tokens_are_steps"] is False
    assert modules["encoder.self_attn"]["tokens_are_steps"] is True
