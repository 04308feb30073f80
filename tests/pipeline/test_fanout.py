"""The fanout: every picture drawn once and written to every sink, a failing sink isolated, histograms
counted only where a sink keeps them, flushes only after a write."""

from __future__ import annotations

import threading

import numpy as np

from lightning_rnnviz.pipeline.drawing import InlineRenderer
from lightning_rnnviz.pipeline.fanout import Fanout
from lightning_rnnviz.render.jobs import Job
from lightning_rnnviz.sinks import FileSink, TensorBoardSink
from tests.helpers.histograms import numpy_histogram


def test_histograms_can_be_switched_off(tmp_path):
    calls = []
    sink = TensorBoardSink(tmp_path, histograms=False)
    fanout = Fanout([sink], InlineRenderer())
    assert not fanout.wants_histograms
    fanout.histogram("rnnviz/hidden_dist/m", lambda: calls.append(1) or vars(numpy_histogram(np.ones(3))), 0)
    fanout.close()
    assert calls == []  # nothing is bucketed when no sink keeps histograms


def test_an_epoch_without_anything_written_flushes_nothing(tmp_path):
    """At an epoch end without a recording nothing is flushed (a logger's writer waits for its queue on
    each flush); after any write, and when asked plainly, every sink is."""

    class Counting(FileSink):
        flushes = 0

        def flush(self):
            Counting.flushes += 1

    fanout = Fanout([Counting(tmp_path)], InlineRenderer())
    fanout.flush(only_if_written=True)
    assert Counting.flushes == 0
    fanout.scalars({"rnnviz/hidden/m/mean_abs": 0.5}, 3)
    fanout.flush(only_if_written=True)
    fanout.flush(only_if_written=True)
    assert Counting.flushes == 1
    fanout.flush()  # the user's scalars, after a recording step: always
    assert Counting.flushes == 2
    fanout.close()


def test_fanout_draws_once_writes_everywhere_and_isolates_a_failing_sink(tmp_path):
    class Broken(FileSink):
        def image(self, tag, picture, step):
            raise OSError("disk full")

    problems = []

    def guard(what, work, *args):
        try:
            return work(*args)
        except Exception as error:  # noqa: BLE001
            problems.append((what, str(error)))

    renderer = InlineRenderer()
    sinks = [FileSink(tmp_path / "a"), Broken(tmp_path / "b", name="Broken"), FileSink(tmp_path / "c")]
    fanout = Fanout(sinks, renderer, guard)

    job = Job("grad_decay", {"history": {0: np.logspace(-3, 0, 10)[None]}, "name": "rnn", "layer_labels": ["layer 0"]},
              "rnnviz/grad_decay/rnn", 4)
    fanout.picture(job)
    fanout.picture(job)  # the same tag and step again (another monitor): not drawn twice
    fanout.close()
    assert (tmp_path / "a" / "grad_decay" / "rnn" / "step_4.png").exists()
    assert (tmp_path / "c" / "grad_decay" / "rnn" / "step_4.png").exists()
    assert problems == [("write 'rnnviz/grad_decay/rnn' to Broken", "disk full")]
    assert renderer.render_s > 0 and renderer.take() == []


def test_a_sink_may_take_some_kinds_of_writes_beside_training(tmp_path):
    """The worker writes, without the output's lock, the kinds of writes a sink takes beside training
    (MLflow: its pictures, texts and documents); the training thread writes the others, and the worker
    flushes only the sinks it writes wholly."""
    from lightning_rnnviz.sinks.base import Picture

    class Split(FileSink):
        writes = []

        def writes_beside(self, kind):
            return kind == "picture"

        def image(self, tag, picture, step):
            Split.writes.append(("image", tag, step))

        def scalars(self, values, step):
            Split.writes.append(("scalars", sorted(values), step))

        def flush(self):
            Split.writes.append(("flush",))

    fanout = Fanout([Split(tmp_path)], InlineRenderer())
    picture = Picture(b"", 1, 1)
    items = [("picture", (Job("hidden", {}, "rnnviz/hidden/m", 4), picture)),
             ("scalars", ({"rnnviz/hidden/m/mean_abs": 0.5}, 4))]
    held = []

    def unlocked():  # from another thread, while this one holds the lock
        held.append(fanout.lock.acquire(blocking=False))
        fanout.deliver_unlocked(items)

    with fanout.lock:
        beside = threading.Thread(target=unlocked)
        beside.start()
        beside.join(timeout=10)
    assert held == [False] and Split.writes == [("image", "rnnviz/hidden/m", 4)]
    fanout.deliver(items, beside_training=True)  # the sinks written wholly beside training: none here
    assert len(Split.writes) == 1
    fanout.deliver(items, beside_training=False)
    assert Split.writes[1:] == [("scalars", ["rnnviz/hidden/m/mean_abs"], 4)]
    fanout.close()
