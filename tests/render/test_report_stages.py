"""A recording's route per module is a list of named stages: the first one that fails is warned once, counted
under its name, and skips that module's remaining stages for the recording; other modules go on, and so does
the next recording. ``strict=True`` raises instead."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytest

import lightning_rnnviz.render as render
from lightning_rnnviz.probe.records import Recording
from lightning_rnnviz.render.report import QUANTITIES, Guard, Reporter, Stage
from tests.render.conftest import make_attention, make_rnn


class Sent:
    """An output that keeps the tags and scalar names a reporter sends."""

    def __init__(self) -> None:
        self.pictures: list[tuple[str, int]] = []
        self.scalar_names: set[str] = set()
        self.histograms: list[str] = []

    def picture(self, job: Any) -> None:
        self.pictures.append((job.tag, job.step))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.scalar_names.update(values)

    def histogram(self, tag: str, buckets: Callable[[], Any], step: int) -> None:
        buckets()
        self.histograms.append(tag)

    def text(self, tag: str, markdown: str, step: int) -> None:
        pass

    def document(self, name: str, data: Mapping[str, Any], step: int) -> None:
        pass


def _failing_for(record: Any, real: Callable[..., Any]) -> Callable[..., Any]:
    def compute(given: Any, *args: Any) -> Any:
        if given is record:
            raise RuntimeError("statistics boom")
        return real(given, *args)

    return compute


def _report_twice(reporter: Reporter, recording: Recording, out: Sent) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reporter.report(recording, out, step=1)
        reporter.report(recording, out, step=2)
    return [str(w.message) for w in caught]


def test_a_failed_stage_skips_that_modules_later_stages_only(monkeypatch):
    broken, fine = make_rnn("LSTM", seed=0), make_rnn("LSTM", seed=5)
    monkeypatch.setattr(render, "hidden_stats", _failing_for(broken, render.hidden_stats))
    recording = Recording({"broken": broken, "fine": fine})
    guard = Guard("test")
    reporter = Reporter(QUANTITIES, recording.records, guard)
    out = Sent()

    messages = _report_twice(reporter, recording, out)

    assert len(messages) == 1, messages  # once, for both recordings
    assert "could not hidden statistics of 'broken'" in messages[0] and "statistics boom" in messages[0]
    assert dict(guard.counts) == {"hidden statistics of 'broken'": 2}
    # the stage before the failed one ran; the ones after it did not, at either step
    assert ("rnnviz/hidden/broken", 1) in out.pictures and ("rnnviz/hidden/broken", 2) in out.pictures
    assert [tag for tag, _ in out.pictures if tag.endswith("/broken") and "hidden" not in tag] == []
    assert [tag for tag in out.histograms if "/broken" in tag] == []
    assert [name for name in out.scalar_names if "/broken/" in name] == []
    # the other module's route is whole, at both steps
    for quantity in ("hidden", "gates", "grad_norm"):
        assert [s for tag, s in out.pictures if tag == f"rnnviz/{quantity}/fine"] == [1, 2], quantity
    assert "rnnviz/hidden_dist/fine" in out.histograms and "rnnviz/gates_dist/fine/forget" in out.histograms
    assert {"rnnviz/hidden/fine/mean_abs", "rnnviz/grad_norm/fine/horizon"} <= out.scalar_names
    # the skipped stages: no gradient curve and no findings' statistics for the broken module this epoch
    drawn, _ = reporter.end_epoch(0, 2, out)
    assert drawn and set(reporter.decay_history) == {"fine"}
    assert set(reporter.summary) == {"fine"}
    assert ("rnnviz/grad_decay/fine", 2) in out.pictures and ("rnnviz/grad_decay/broken", 2) not in out.pictures


def test_a_failed_attention_stage_skips_its_findings_statistics(monkeypatch):
    broken, fine = make_attention(seed=0), make_attention(seed=1)
    monkeypatch.setattr(render, "attention_stats", _failing_for(broken, render.attention_stats))
    recording = Recording({"broken": broken, "fine": fine})
    guard = Guard("test")
    reporter = Reporter(("attention",), recording.records, guard)
    out = Sent()

    messages = _report_twice(reporter, recording, out)

    assert len(messages) == 1 and "attention statistics of 'broken'" in messages[0], messages
    assert dict(guard.counts) == {"attention statistics of 'broken'": 2}
    assert [s for tag, s in out.pictures if tag == "rnnviz/attention/broken"] == [1, 2]  # before the failure
    reporter.end_epoch(0, 2, out)
    assert set(reporter.summary) == {"fine"}


def test_strict_raises_the_failed_stage(monkeypatch):
    broken = make_rnn("GRU", seed=0)
    monkeypatch.setattr(render, "hidden_stats", _failing_for(broken, render.hidden_stats))
    recording = Recording({"broken": broken})
    guard = Guard("test", strict=True)
    with pytest.raises(RuntimeError, match="statistics boom"):
        Reporter(QUANTITIES, recording.records, guard).report(recording, Sent(), step=1)
    assert not guard.counts


def test_guard_runs_named_steps_and_stages():
    guard = Guard("test")
    ran: list[str] = []

    def step(name: str, *, fail: bool = False) -> str:
        if fail:
            raise ValueError(name)
        ran.append(name)
        return name

    assert guard.run("first", step, "a") == "a"
    with pytest.warns(UserWarning, match=r"test could not second \(ValueError: b\)"):
        assert guard.run("second", step, "b", fail=True) is None
    route = [Stage("one", step, ("c",)), Stage("two", _raise_value, ("d",)), Stage("three", step, ("e",))]
    with pytest.warns(UserWarning, match="could not two"):
        assert guard.stages(route) is False
    assert guard.stages([Stage("one", step, ("f",))]) is True
    assert ran == ["a", "c", "f"]  # "three" never ran
    assert dict(guard.counts) == {"second": 1, "two": 1}


def _raise_value(name: str) -> None:
    raise ValueError(name)
