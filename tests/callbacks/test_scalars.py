"""Which scalars a run writes: a compact default set, every other statistic behind ``scalars="all"``, and a
Custom Scalars layout that follows the choice (issue 24, item 7)."""

from __future__ import annotations

import copy
import csv
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from lightning_rnnviz import AttentionMonitor, GradientNormMonitor, HiddenStateMonitor, RNNViz
from lightning_rnnviz.render.report import default_scalar, scalar_layout
from tests.helpers.events import RunEvents
from tests.helpers.models import OneRNNModel
from tests.helpers.namespace import CSVLogger, TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
)

# What a one-layer LSTM writes by default: the gradient's norms and horizon, mean |h|, each gate's mean.
DEFAULT_TAGS = [
    "rnnviz/gates/rnn/cell_mean",
    "rnnviz/gates/rnn/forget_mean",
    "rnnviz/gates/rnn/input_mean",
    "rnnviz/gates/rnn/output_mean",
    "rnnviz/grad_norm/rnn/first_norm",
    "rnnviz/grad_norm/rnn/horizon",
    "rnnviz/grad_norm/rnn/last_norm",
    "rnnviz/grad_norm/rnn/log10_ratio",
    "rnnviz/hidden/rnn/mean_abs",
]
# What `scalars="all"` adds (the recording on the training thread: `background=False`).
OTHER_TAGS = [
    "rnnviz/gates/rnn/cell_saturated_high",
    "rnnviz/gates/rnn/cell_saturated_low",
    "rnnviz/gates/rnn/exact",
    "rnnviz/gates/rnn/forget_saturated_high",
    "rnnviz/gates/rnn/forget_saturated_low",
    "rnnviz/gates/rnn/input_saturated_high",
    "rnnviz/gates/rnn/input_saturated_low",
    "rnnviz/gates/rnn/output_saturated_high",
    "rnnviz/gates/rnn/output_saturated_low",
    "rnnviz/grad_norm/rnn/decay_per_step",
    "rnnviz/grad_norm/rnn/exact",
    "rnnviz/hidden/rnn/exact",
    "rnnviz/hidden/rnn/saturated",
    "rnnviz/hidden/rnn/step_change",
    "rnnviz/overhead/dropped_figures",
    "rnnviz/overhead/epoch_end_ms",
    "rnnviz/overhead/every_n_steps",
    "rnnviz/overhead/render_ms",
    "rnnviz/overhead/replay_ms",
    "rnnviz/overhead/train_thread_ms",
    "rnnviz/overhead/write_ms",
]
RECORDED = [0, 2, 5]  # 4 batches an epoch, 2 epochs, log_every_n_steps=3, and the very first batch


def _fit(tmp_path: Path, **callback) -> tuple[pl.Trainer, RNNViz]:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, 3), torch.randn(32))
    cb = RNNViz(strict=True, **callback)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=3, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[cb],
                         logger=[TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")])
    trainer.fit(OneRNNModel("LSTM", lr=0.05), torch.utils.data.DataLoader(data, batch_size=8))
    return trainer, cb


def _written(trainer: pl.Trainer) -> tuple[list[str], list[str], RunEvents]:
    """The rnnviz scalar tags in TensorBoard, and the columns of CSVLogger's ``metrics.csv``."""
    tb, csv_logger = trainer.loggers
    events = RunEvents(tb.log_dir)
    tags = sorted(t for t in events.Tags()["scalars"] if t.startswith("rnnviz/"))
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as file:
        columns = next(csv.reader(file))
    return tags, columns, events


def test_a_one_lstm_run_writes_the_default_scalars_and_nothing_else(tmp_path):
    """The exact list: nine rnnviz scalars in TensorBoard and as many columns in ``metrics.csv`` (beside
    the user's ``train_loss`` and Lightning's ``epoch`` and ``step``), at every recorded step. Until 0.1 the
    same run wrote 30 (exact flags, saturation per gate and side, overhead timings)."""
    trainer, cb = _fit(tmp_path)
    tags, columns, events = _written(trainer)
    assert tags == DEFAULT_TAGS
    assert sorted(columns) == sorted(DEFAULT_TAGS + ["epoch", "step", "train_loss"])
    for tag in DEFAULT_TAGS:
        assert [e.step for e in events.Scalars(tag)] == RECORDED, tag
    # Every statistic is still computed: findings and summary.json have what they read.
    summary = json.loads((Path(trainer.loggers[0].log_dir) / "rnnviz" / "summary.json").read_text())
    epoch = summary["modules"]["rnn"]["epochs"]["1"]
    assert {"horizon", "decay_per_step", "log10_ratio", "gate_means", "grad_norm", "exact"} <= set(epoch)
    assert epoch["exact"] is True and len(epoch["decay_per_step"]) == 1
    assert set(epoch["gate_means"]) == {"input", "forget", "cell", "output"}


def test_scalars_all_writes_every_other_statistic_the_exact_flags_and_the_overhead(tmp_path):
    trainer, cb = _fit(tmp_path, scalars="all", background=False)
    tags, columns, events = _written(trainer)
    assert tags == sorted(DEFAULT_TAGS + OTHER_TAGS)
    assert sorted(columns) == sorted(DEFAULT_TAGS + OTHER_TAGS + ["epoch", "step", "train_loss"])
    assert [e.step for e in events.Scalars("rnnviz/overhead/train_thread_ms")] == RECORDED
    assert [e.value for e in events.Scalars("rnnviz/grad_norm/rnn/exact")] == [1.0] * 3


def test_the_default_set_per_statistic():
    assert [s for s in ("first_norm", "last_norm", "horizon", "log10_ratio", "decay_per_step", "exact")
            if default_scalar("grad_norm", s + "/layer1_reverse")] == ["first_norm", "last_norm", "horizon",
                                                                        "log10_ratio"]
    assert [s for s in ("mean_abs", "saturated", "step_change") if default_scalar("hidden", s)] == ["mean_abs"]
    assert [s for s in ("update_mean", "update_saturated_low", "reset_saturated_high")
            if default_scalar("gates", s + "/layer0")] == ["update_mean"]
    assert [s for s in ("entropy_norm/head0", "entropy/head0", "focus/head0")
            if default_scalar("attention", s)] == ["entropy_norm/head0"]


def _matched(charts: dict, tags: list[str]) -> dict[str, list[str]]:
    """Chart title -> the tags its regexes match, as TensorBoard's Custom Scalars matches them (``re.match``)."""
    return {title: [t for t in tags if any(re.match(r, t) for r in regexes)]
            for group in charts.values() for title, regexes in group.items()}


def test_the_custom_scalars_layout_follows_the_choice():
    """Default charts for the default tags only, each with a line; with "all" every written tag is on a
    chart; titles say what their lines are."""
    kinds = {"rnn": "LSTM"}
    default = scalar_layout(kinds)
    matched = _matched(default, DEFAULT_TAGS + OTHER_TAGS)
    assert all(lines and set(lines) <= set(DEFAULT_TAGS) for lines in matched.values()), matched
    assert set().union(*matched.values()) == set(DEFAULT_TAGS)
    assert sorted(default) == ["rnnviz: every module", "rnnviz: rnn"]
    assert sorted(default["rnnviz: rnn"]) == [
        "gates: mean activation, one line per gate and layer",
        "gradient: horizon (steps back to 1 % of the peak norm), one line per layer",
        "gradient: log10(first / last norm), one line per layer",
        "gradient: ||dL/dh_t|| at the first and at the last step, two lines per layer",
        "hidden: mean |h_t|, one line per layer",
    ]
    every = scalar_layout(kinds, scalars="all")
    matched = _matched(every, DEFAULT_TAGS + OTHER_TAGS)
    assert all(matched.values()), matched
    assert set().union(*matched.values()) == set(DEFAULT_TAGS + OTHER_TAGS)
    assert set(default["rnnviz: rnn"]) < set(every["rnnviz: rnn"]) and "rnnviz: overhead" in every
    # a bidirectional module's lines are per layer and direction; attention's per head
    both = scalar_layout({"enc": "GRU", "attn": "attention"}, bidirectional=["enc"])
    assert "gradient: log10(first / last norm), one line per layer and direction" in both["rnnviz: enc"]
    assert list(both["rnnviz: attn"]) == ["attention: normalised entropy (1 = uniform), one line per head"]
    assert [r for r in both["rnnviz: attn"].values()] == [["rnnviz/attention/attn/entropy_norm/.*"]]
    assert len(scalar_layout({"enc": "GRU", "attn": "attention"}, scalars="all")["rnnviz: attn"]) == 4


@pytest.mark.parametrize("value", ["some", "ALL", None, True, ["all"]])
@pytest.mark.parametrize("cls", [RNNViz, HiddenStateMonitor, AttentionMonitor])
def test_scalars_must_be_default_or_all(cls, value):
    with pytest.raises(ValueError, match=r'`scalars` must be "default" \(.*\) or "all" \(.*\), got '):
        cls(scalars=value)


@pytest.mark.parametrize("cls", [RNNViz, GradientNormMonitor])
def test_the_choice_is_kept_by_pickles_and_copies(cls):
    cb = cls(scalars="all")
    assert cb.scalars == "all" and cb._reporter.scalars == "all"
    for twin in (pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb), copy.copy(cb)):
        assert type(twin) is cls and twin.scalars == "all" and twin._reporter.scalars == "all"
    assert cls().scalars == "default" and pickle.loads(pickle.dumps(cls()))._reporter.scalars == "default"
