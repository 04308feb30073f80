"""The recording worker (``placement == "thread"``): the same pictures, statistics and histograms as the
training thread's route, training bit-identical, and nothing process-wide touched from the worker."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from torch import nn

from lightning_rnnviz import RNNViz, RNNVizWarning
from lightning_rnnviz.pipeline.worker import Delivery, EpochEnd, Worker, hand_off
from lightning_rnnviz.probe import Probe
from lightning_rnnviz.probe import replay as replay_module
from tests.helpers.events import RunEvents
from tests.helpers.models import PackedBiLSTMModel, TinySeqModel, loader, padded_loader
from tests.helpers.namespace import TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
    "ignore:.*val_dataloader.*",
)


def _fit(tmp_path, name, model, callback, data, **kwargs):
    logger = TensorBoardLogger(tmp_path, name=name)
    settings = dict(max_epochs=2, log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, logger=logger,
                    callbacks=list(callback) if isinstance(callback, list) else [callback] if callback else [],
                    num_sanity_val_steps=0)
    trainer = pl.Trainer(**{**settings, **kwargs})
    trainer.fit(model, data, data if hasattr(model, "validation_step") else None)
    return trainer


def _everything(trainer) -> dict:
    """Every picture (PNG bytes), statistic and histogram of the run, by tag and step; the overhead
    statistics, which are timings, by step only."""
    events = RunEvents(trainer.logger.log_dir)
    tags = events.Tags()
    seen = {}
    for tag in tags["images"]:
        seen[tag] = [(e.step, e.encoded_image_string) for e in events.Images(tag)]
    for tag in tags["scalars"]:
        values = [(e.step, e.value) for e in events.Scalars(tag)]
        seen[tag] = [s for s, _ in values] if "/overhead/" in tag else values
    for tag in tags["histograms"]:
        seen[tag] = [(e.step, e.histogram_value.num, e.histogram_value.sum, tuple(e.histogram_value.bucket))
                     for e in events.Histograms(tag)]
    return seen


@pytest.mark.parametrize("case", ["tiny", "packed"])
def test_the_worker_writes_what_the_training_thread_writes(tmp_path, case):
    """Pixel for pixel, value for value, step for step; training bit-identical in both."""
    runs, weights = {}, {}
    for background in (False, "thread"):
        pl.seed_everything(3)
        if case == "tiny":
            model, data = TinySeqModel(), loader()
        else:
            model, data = PackedBiLSTMModel(), padded_loader([6, 3, 5, 2, 6, 4, 1, 6], batch_size=4)
        cb = RNNViz(every_n_steps=1, background=background, strict=True, scalars="all")
        trainer = _fit(tmp_path, str(background), model, cb, data)
        assert cb.placement == ("thread" if background else "inline")
        runs[background] = _everything(trainer)
        weights[background] = {n: p.detach().clone() for n, p in model.named_parameters()}
    inline, worker = runs[False], runs["thread"]
    off_thread = {"rnnviz/overhead/offthread_ms", "rnnviz/overhead/wait_ms", "rnnviz/overhead/epoch_end_offthread_ms"}
    assert set(inline) - off_thread == set(worker) - off_thread
    assert {"rnnviz/overhead/offthread_ms", "rnnviz/overhead/epoch_end_offthread_ms"} <= set(worker)
    for tag in inline:
        assert worker[tag] == inline[tag], tag
    for name in weights[False]:
        assert torch.equal(weights[False][name], weights["thread"][name]), name
    pl.seed_everything(3)
    plain = TinySeqModel() if case == "tiny" else PackedBiLSTMModel()
    _fit(tmp_path, "none", plain, None, loader() if case == "tiny" else padded_loader([6, 3, 5, 2, 6, 4, 1, 6],
                                                                                        batch_size=4))
    for name, value in plain.named_parameters():
        assert torch.equal(value.detach(), weights["thread"][name]), name


class _DropoutLSTM(TinySeqModel):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8, num_layers=3, dropout=0.3, batch_first=True)


def test_dropout_is_replayed_exactly_on_the_worker_from_masks_drawn_at_the_hand_off(tmp_path, monkeypatch):
    """The masks are drawn on the training thread from the call's generator state; the worker never sets
    the global generator, yet the record is exact, as on the training thread."""
    setters = []
    real = torch.set_rng_state
    monkeypatch.setattr(torch, "set_rng_state", lambda s: (setters.append(threading.current_thread()), real(s)))
    monkeypatch.setattr(replay_module.torch, "set_rng_state", torch.set_rng_state)
    runs = {}
    for background in (False, "thread"):
        pl.seed_everything(5)
        cb = RNNViz(every_n_steps=2, background=background, validation=False, strict=True, scalars="all")
        trainer = _fit(tmp_path, str(background), _DropoutLSTM(), cb, loader(), max_epochs=1)
        runs[background] = _everything(trainer)
    assert [v for _, v in runs["thread"]["rnnviz/grad_norm/rnn/exact"]] == [1.0] * 3
    assert runs["thread"]["rnnviz/grad_norm/rnn/exact"] == runs[False]["rnnviz/grad_norm/rnn/exact"]
    for tag in runs[False]:
        if "/overhead/" not in tag:
            assert runs["thread"][tag] == runs[False][tag], tag
    assert setters and set(setters) == {threading.main_thread()}


def test_nothing_process_wide_is_touched_from_the_worker(tmp_path, monkeypatch):
    """No warning filter swapped, no flag or generator set, no thread count changed for the process while
    the worker runs: each such call is made on the training thread, or not at all."""
    calls: list[tuple[str, str]] = []

    def spy(name, real):
        def called(*args, **kwargs):
            calls.append((name, threading.current_thread().name))
            return real(*args, **kwargs)
        return called

    monkeypatch.setattr(warnings, "catch_warnings", spy("catch_warnings", warnings.catch_warnings))
    monkeypatch.setattr(torch, "set_rng_state", spy("set_rng_state", torch.set_rng_state))
    monkeypatch.setattr(torch, "manual_seed", spy("manual_seed", torch.manual_seed))
    monkeypatch.setattr(torch, "set_num_threads", spy("set_num_threads", torch.set_num_threads))
    monkeypatch.setattr(replay_module, "tf32_off", spy("tf32_off", replay_module.tf32_off))
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    filters = list(warnings.filters)
    cb = RNNViz(every_n_steps=1, background="thread", strict=True)
    _fit(tmp_path, "w", TinySeqModel(), cb, loader(), max_epochs=1)
    assert [c for c in calls if c[1] == "rnnviz-worker"] == []
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision()) == flags
    # the user's filters are all there, in their order (ours, scoped to our own calls, may stand before)
    assert [f for f in warnings.filters if f in filters] == filters


class _NaNModel(TinySeqModel):
    def training_step(self, batch, batch_idx):
        x, y = batch
        h, _ = self.rnn(x)
        return (h * float("nan")).sum() * 0.0 + nn.functional.mse_loss(self.head(h[:, -1]).squeeze(-1), y)


def test_the_workers_warnings_reach_the_users_filters_on_the_training_thread(tmp_path, monkeypatch):
    """Held on the worker, given by the training thread, where a user's `error` filter acts (with
    `warn_explicit` at the user's class, or `warn` where none is known)."""
    given = []

    def spy(real):
        def warn(message, *args, **kwargs):
            given.append((str(message), threading.current_thread().name))
            return real(message, *args, **kwargs)
        return warn

    monkeypatch.setattr(warnings, "warn", spy(warnings.warn))
    monkeypatch.setattr(warnings, "warn_explicit", spy(warnings.warn_explicit))
    cb = RNNViz(every_n_steps=1, background="thread", validation=False)
    with pytest.warns(RNNVizWarning, match="NaN/Inf"):
        _fit(tmp_path, "w", _NaNModel(), cb, loader(), max_epochs=1)
    ours = [thread for message, thread in given if "NaN/Inf" in message]
    assert ours == [threading.main_thread().name]


def test_strict_re_raises_a_workers_error_on_the_training_thread(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("replay broke")

    monkeypatch.setattr("lightning_rnnviz.probe.build.replay_rnn", broken)
    cb = RNNViz(every_n_steps=1, background="thread", validation=False, strict=True)
    with pytest.raises(RuntimeError, match="replay broke"):
        _fit(tmp_path, "w", TinySeqModel(), cb, loader(), max_epochs=1)
    assert not any(t.name == "rnnviz-worker" and t.is_alive() for t in threading.enumerate())


def test_without_strict_a_workers_error_is_warned_once_and_counted(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("replay broke")

    monkeypatch.setattr("lightning_rnnviz.probe.build.replay_rnn", broken)
    cb = RNNViz(every_n_steps=1, background="thread", validation=False)
    with pytest.warns(RNNVizWarning, match="replay broke"):
        trainer = _fit(tmp_path, "w", TinySeqModel(), cb, loader(), max_epochs=1)
    assert "rnnviz/hidden/rnn" not in RunEvents(trainer.logger.log_dir).Tags()["images"]
    assert "rnnviz/attention/attn" in RunEvents(trainer.logger.log_dir).Tags()["images"]  # the others go on


def test_the_worker_finishes_in_order_and_waits_for_room():
    """At most one recording waits beside the one being finished; a hand-off beyond that waits (so none is
    dropped), and deliveries come back in the order handed."""
    gate = threading.Event()
    order: list[int] = []
    model = nn.LSTM(2, 3)
    probe = Probe(model)
    worker = Worker(max_pending=1)
    try:
        for step in range(3):
            with probe.capture() as captured:
                model(torch.randn(4, 2, 2))[0].sum().backward()

            def report(recording, out: Delivery, step=step):
                gate.wait(5)
                order.append(step)
                out.scalars({"x": float(step)}, step)

            handed = hand_off(captured, None, [report], step)
            if step == 2:
                threading.Timer(0.2, gate.set).start()  # the third hand-off waits until the first is done
            worker.submit(handed)
        assert worker.waited_s >= 0.1
        assert worker.wait(10)
        deliveries = worker.ready()
    finally:
        gate.set()
        worker.close()
    assert order == [0, 1, 2]
    assert [d.step for d in deliveries] == [0, 1, 2]
    assert [d.items for d in deliveries] == [[("scalars", ({"x": float(s)}, s))] for s in range(3)]
    assert all(d.error is None and d.replay_s > 0 for d in deliveries)


def test_a_held_recording_starts_at_go_after_the_hold_or_when_anything_needs_it():
    """A recording handed over with ``hold`` is not started until ``go`` (the next batch start), until
    :attr:`Worker.HOLD_S` has passed, or until something is handed over, waited for or closed after it."""
    model = nn.LSTM(2, 3)
    probe = Probe(model)
    started: list[int] = []
    began = threading.Event()

    def handed(step: int):
        with probe.capture() as captured:
            model(torch.randn(4, 2, 2))[0].sum().backward()

        def report(recording, out: Delivery):
            started.append(step)
            began.set()

        return hand_off(captured, None, [report], step)

    worker = Worker()
    worker.HOLD_S = 30.0
    try:
        worker.submit(handed(0), hold=True)
        assert not began.wait(0.3) and started == []  # held
        worker.go()
        assert worker.wait(10) and started == [0]
        worker.go()  # nothing held: nothing happens

        worker.submit(handed(1), hold=True)
        assert worker.wait(10) and started == [0, 1]  # waiting for it lets it go

        worker.submit(handed(2), hold=True)
        worker.submit(EpochEnd(lambda out: [], lambda out: False, 3))  # so does anything handed over after it
        assert worker.wait(10) and started == [0, 1, 2]

        worker.HOLD_S = 0.1
        began.clear()
        worker.submit(handed(4), hold=True)
        assert began.wait(10) and started == [0, 1, 2, 4]  # and the hold ends on its own
        worker.submit(handed(5), hold=True)
    finally:
        worker.close()
    assert started == [0, 1, 2, 4, 5]  # closing finishes what was held
    assert all(d.error is None for d in worker.ready())


class _StampsBatchStarts(pl.Callback):
    """Placed first: the time every training batch starts."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def test_on_the_cpu_the_worker_starts_a_recording_at_the_next_batch_start(tmp_path, monkeypatch):
    """The loop's own Python after a recorded (logging) step holds the GIL: the worker, which needs it too,
    begins the recording when the next batch starts, not while that runs (see `Worker.submit`). (A
    recording at an epoch's last batch begins when the epoch's end is handed over.)"""
    real_finish, began = Worker._finish, {}
    stamps = _StampsBatchStarts()

    def finish(self, handed):
        began[handed.step] = len(stamps.starts)  # batches started so far
        return real_finish(self, handed)

    monkeypatch.setattr(Worker, "_finish", finish)
    monkeypatch.setattr(Worker, "HOLD_S", 60.0)  # only what the training thread does lets it go
    cb = RNNViz(every_n_steps=2, background="thread", validation=False)
    trainer = _fit(tmp_path, "held", TinySeqModel(), [stamps, cb], loader(), max_epochs=2)
    assert cb.placement == "thread"
    per_epoch = trainer.num_training_batches
    # step s is batch s's recording: it begins once batch s + 1 has started (stamped before RNNViz's
    # batch start), or later when the worker is still busy with the one before
    followed = [s for s in sorted(began) if (s + 1) % per_epoch]
    assert len(followed) >= 3 and 0 in followed, began
    assert all(began[s] >= s + 2 for s in followed), began


class _OpensTheGate(pl.Callback):
    """Placed after RNNViz: at each epoch end opens the gate the worker's recordings wait at."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def on_train_epoch_end(self, trainer, pl_module):
        self.gate.set()


class _ReadsTheHistory(pl.Callback):
    """Placed after RNNViz: reads its `decay_history` at each epoch end, as a user's callback would."""

    def __init__(self, monitor: RNNViz) -> None:
        self.monitor, self.seen = monitor, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(sorted(self.monitor.decay_history.get("rnn", {})))


def test_an_epoch_end_waits_neither_for_the_worker_nor_draws_on_the_training_thread(tmp_path, monkeypatch):
    """The epoch's end (its grad_decay picture, findings and summary) is the worker's, after the epoch's
    recordings: the training thread goes on while the last recording is still being finished. Here the
    worker's recordings wait at a gate that only a callback after RNNViz's epoch end opens: had the epoch
    end waited for the worker, the gate would have timed out. What the epoch end writes and says still
    comes, once: its lines in the log, one grad_decay per epoch; and a callback that reads the monitor's
    `decay_history` at the epoch end (after the gate opened) reads it complete."""
    from lightning_rnnviz.render.report import Reporter

    gate, opened, drew_on = threading.Event(), [], set()
    real_report, real_close, real_draw = Reporter.report, Reporter.close_epoch, Reporter.draw_epoch

    def report(self, *args, **kwargs):
        opened.append(gate.wait(10))
        return real_report(self, *args, **kwargs)

    def close_epoch(self, epoch, *args, **kwargs):
        drew_on.add(threading.current_thread().name)
        lines = real_close(self, epoch, *args, **kwargs)
        return [*lines, f"epoch {epoch} ended"]  # a line as a finding's would be said

    def draw_epoch(self, *args, **kwargs):
        drew_on.add(threading.current_thread().name)
        return real_draw(self, *args, **kwargs)

    monkeypatch.setattr(Reporter, "report", report)
    monkeypatch.setattr(Reporter, "close_epoch", close_epoch)
    monkeypatch.setattr(Reporter, "draw_epoch", draw_epoch)
    cb = RNNViz(every_n_steps=2, background="thread", validation=False, log_first_step=False)
    said = []
    monkeypatch.setattr("lightning_rnnviz.callbacks.rnnviz.info", lambda trainer, line: said.append(line))
    reader = _ReadsTheHistory(cb)
    trainer = _fit(tmp_path, "w", TinySeqModel(), [cb, _OpensTheGate(gate), reader], loader(), max_epochs=2)
    assert cb.placement == "thread"
    assert opened and all(opened), opened
    assert drew_on == {"rnnviz-worker"}
    events = RunEvents(trainer.logger.log_dir)
    assert [e.step for e in events.Images("rnnviz/grad_decay/rnn")] == [4, 8]
    assert sorted(cb.decay_history["rnn"]) == [0, 1]
    assert [line for line in said if line.endswith("ended")] == ["epoch 0 ended", "epoch 1 ended"]
    assert reader.seen == [[0], [0, 1]]  # read from the training thread: complete, the worker waited for


class _Checkpoints(pl.Callback):
    """Placed after RNNViz: saves its state at each epoch end, as a `ModelCheckpoint` does there, then
    opens the gate."""

    def __init__(self, monitor: RNNViz, gate: threading.Event) -> None:
        self.monitor, self.gate, self.saved = monitor, gate, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.saved.append(sorted(self.monitor.state_dict()["decay_history"].get("rnn", {})))
        self.gate.set()


def test_a_checkpoint_at_an_epoch_end_waits_for_the_epochs_state_not_for_its_pictures(tmp_path, monkeypatch):
    """A checkpoint at the epoch end (Lightning's default `ModelCheckpoint`) saves the state the epoch's end
    adds (its curves, findings, summary) complete, without waiting for the epoch's grad_decay picture: here
    the worker's drawing of it waits at a gate that only the checkpointing callback opens, after it saved.
    Had saving waited for the drawing, the gate would have timed out."""
    from lightning_rnnviz.render.report import Reporter

    gate, opened = threading.Event(), []
    real_draw = Reporter.draw_epoch

    def draw_epoch(self, *args, **kwargs):
        opened.append(gate.wait(10))
        gate.clear()
        return real_draw(self, *args, **kwargs)

    monkeypatch.setattr(Reporter, "draw_epoch", draw_epoch)
    cb = RNNViz(every_n_steps=2, background="thread", validation=False, log_first_step=False)
    saver = _Checkpoints(cb, gate)
    trainer = _fit(tmp_path, "c", TinySeqModel(), [cb, saver], loader(), max_epochs=2)
    assert cb.placement == "thread"
    assert opened == [True, True]
    assert saver.saved == [[0], [0, 1]]
    events = RunEvents(trainer.logger.log_dir)
    assert [e.step for e in events.Images("rnnviz/grad_decay/rnn")] == [4, 8]
    assert cb.error_counts == {}


def test_wait_settled_does_not_wait_for_an_epoch_ends_drawing_nor_hang_when_closing_it_fails():
    """`wait_settled` returns once an epoch's end is closed, while its drawing goes on (`wait` waits for that);
    an epoch end whose closing raised is settled too, and its error reaches the training thread."""
    worker = Worker()
    try:
        drawing, go_on = threading.Event(), threading.Event()

        def draw(delivery):
            drawing.set()
            return go_on.wait(10)

        worker.submit(EpochEnd(lambda delivery: ["closed"], draw, 4))
        assert drawing.wait(10) and worker.wait_settled(timeout=10)
        assert not worker.idle and not worker.wait(timeout=0.05)
        go_on.set()
        assert worker.wait(timeout=10)

        def failing(delivery):
            raise RuntimeError("closing failed")

        worker.submit(EpochEnd(failing, lambda delivery: True, 8))
        assert worker.wait_settled(timeout=10) and worker.wait(timeout=10)
        first, second = worker.ready()
        assert (first.step, first.lines, first.drawn, first.error) == (4, ["closed"], True, None)
        assert second.step == 8 and isinstance(second.error, RuntimeError) and not second.drawn
    finally:
        go_on.set()
        worker.close()


def test_a_hand_off_copies_what_the_capture_only_referenced():
    """Training may change the batch or the outputs in place once it goes on: the worker's replay reads
    copies taken at the hand-off."""
    model = nn.LSTM(2, 3, batch_first=True)
    x = torch.randn(2, 5, 2)
    probe = Probe(model)
    with probe.capture() as captured:
        out, _ = model(x)
        out.sum().backward()
    expected = captured.finish()  # (a capture may be finished twice; its data are the same)
    with probe.capture() as captured:
        out, _ = model(x)
        out.sum().backward()
    captured.hand_off()
    x.zero_()  # the user reuses their buffer
    with torch.no_grad():
        out.zero_()
    recording = captured.finish()
    torch.testing.assert_close(recording[""].hidden, expected[""].hidden, rtol=0, atol=0)
    torch.testing.assert_close(recording[""].hidden_grad, expected[""].hidden_grad, rtol=0, atol=0)


def test_the_worker_lets_a_recording_go_once_finished():
    """What the capture held and the recording the worker finished are gone once it is done with them (on
    a GPU they are device memory), not kept until the next recording arrives."""
    import gc
    import weakref

    model = nn.LSTM(2, 3)
    probe = Probe(model)
    made: list[weakref.ref] = []
    worker = Worker()
    try:
        with probe.capture() as captured:
            model(torch.randn(4, 2, 2))[0].sum().backward()

        def report(recording, out):
            made.extend(weakref.ref(t) for r in recording.rnn().values() for t in (r.hidden, r.hidden_grad))

        handed = hand_off(captured, None, [report], 0)
        made.extend(weakref.ref(t) for t in handed.held_tensors)
        worker.submit(handed)
        del handed, captured
        assert worker.wait(10)
        [delivery] = worker.ready()
        assert delivery.error is None
        gc.collect()
        assert made and not [ref for ref in made if ref() is not None]
    finally:
        worker.close()


def test_on_cuda_the_worker_runs_on_its_own_stream_after_the_hand_off(monkeypatch):
    """No GPU here: the CUDA calls are stand-ins that say what was asked of them. The worker makes a stream
    on the device the model ran on (not its own thread's current device), orders it after the hand-off's
    event, marks every handed tensor used there, and finishes the recording inside it, between two timing
    events on that stream, whose span it reads once the stream has reached the second."""
    from lightning_rnnviz.pipeline import worker as pipeline
    from lightning_rnnviz.probe import Recording

    log: list = []

    class Stream:
        def __init__(self, device=None):
            self.device = device
            log.append(("stream", device))

        def wait_event(self, event):
            log.append(("wait", event))

    class Event:
        made = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            Event.made += 1
            self.name = f"event {Event.made}"

        def record(self, stream):
            log.append((f"{self.name} recorded", stream.device))

        def synchronize(self):
            log.append((f"{self.name} reached",))

        def elapsed_time(self, other):
            log.append(("read", self.name, other.name))
            return 12.5  # ms

    class Context:
        def __init__(self, what, value):
            self.what, self.value = what, value

        def __enter__(self):
            log.append(("enter", self.what, self.value))

        def __exit__(self, *exc):
            log.append(("exit", self.what))

    class Held:
        is_cuda = True
        device = "cuda:1"

        def record_stream(self, stream):
            log.append(("used on", stream.device))

    class Finished:
        def finish(self, grad_scale):
            log.append(("finish", grad_scale))
            return Recording()

    monkeypatch.setattr(pipeline.torch.cuda, "Stream", Stream)
    monkeypatch.setattr(pipeline.torch.cuda, "Event", Event)
    monkeypatch.setattr(pipeline.torch.cuda, "stream", lambda s: Context("stream", s.device))
    monkeypatch.setattr(pipeline.torch.cuda, "device", lambda d: Context("device", d))
    worker = Worker()
    try:
        worker.submit(pipeline.Handed(Finished(), 2.0, [], 7, held_tensors=[Held(), Held()], event="event"))
        assert worker.wait(10)
        [delivery] = worker.ready()
    finally:
        worker.close()
    assert delivery.error is None, delivery.error
    assert log == [("stream", "cuda:1"), ("wait", "event"), ("used on", "cuda:1"), ("used on", "cuda:1"),
                   ("enter", "device", "cuda:1"), ("enter", "stream", "cuda:1"),
                   ("event 1 recorded", "cuda:1"), ("finish", 2.0), ("event 2 recorded", "cuda:1"),
                   ("exit", "stream"), ("exit", "device"), ("event 2 reached",),
                   ("read", "event 1", "event 2")]
    assert delivery.device_s == 0.0125


def test_off_cuda_a_recording_has_no_device_span():
    from lightning_rnnviz.pipeline import worker as pipeline
    from lightning_rnnviz.probe import Recording

    class Finished:
        def finish(self, grad_scale):
            return Recording()

    worker = Worker()
    try:
        worker.submit(pipeline.Handed(Finished(), None, [], 7))
        assert worker.wait(10)
        [delivery] = worker.ready()
    finally:
        worker.close()
    assert delivery.error is None and delivery.device_s is None


def test_on_cuda_the_hand_off_records_an_event_on_the_models_stream(monkeypatch):
    from lightning_rnnviz.pipeline import worker as pipeline

    recorded = []

    class Event:
        def record(self, stream):
            recorded.append(stream)

    class Held:
        is_cuda = True
        device = "cuda:1"

    class Captured:
        def hand_off(self):
            return [Held()]

    monkeypatch.setattr(pipeline.torch.cuda, "Event", Event)
    monkeypatch.setattr(pipeline.torch.cuda, "current_stream", lambda device: f"current stream of {device}")
    handed = hand_off(Captured(), None, [], 3, "rnnviz/val")
    assert isinstance(handed.event, Event) and recorded == ["current stream of cuda:1"]
    assert (handed.step, handed.prefix, len(handed.held_tensors)) == (3, "rnnviz/val", 1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_checkpoint_mid_epoch_reads_the_state_once_the_worker_is_done(tmp_path):
    """`ModelCheckpoint(every_n_train_steps=1)` asks for the callback's state at every step, while the
    worker may be adding the last recording to it: the state is read after it, and a resume restores it."""
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    cb = RNNViz(every_n_steps=1, background="thread", validation=False, strict=True)
    _fit(tmp_path, "first", TinySeqModel(), cb, loader(), callbacks=[cb, saver], enable_checkpointing=True)
    assert sorted(cb.decay_history["rnn"]) == [0, 1]
    last = max((tmp_path / "ckpt").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    again = RNNViz(every_n_steps=1, background="thread", validation=False, strict=True)
    trainer = pl.Trainer(max_epochs=3, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         logger=TensorBoardLogger(tmp_path, name="again"), callbacks=[again],
                         num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(TinySeqModel(), loader(), ckpt_path=last)
    assert {0, 2} <= set(again.decay_history["rnn"])  # the saved epoch and the new one
    torch.testing.assert_close(again.decay_history["rnn"][0], cb.decay_history["rnn"][0])


def test_the_workers_pictures_are_drawn_in_the_drawing_process(tmp_path, monkeypatch):
    """Painting holds the GIL, which the training thread needs: the worker hands each picture to a drawing
    process and waits for it, drawing nothing itself once that process has started."""
    import time

    from lightning_rnnviz.pipeline import recorder as recorder_module
    from lightning_rnnviz.pipeline import worker as worker_module
    from lightning_rnnviz.pipeline.drawing import DrawingProcess

    class Started(DrawingProcess):  # the fit starts once the process has (in a real run, it does not wait)
        def __init__(self):
            super().__init__()
            deadline = time.monotonic() + 120
            while not self.ready:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def not_here(job):
        raise AssertionError(f"{job.tag} drawn on the worker thread")

    monkeypatch.setattr(recorder_module, "DrawingProcess", Started)
    monkeypatch.setattr(worker_module, "draw", not_here)
    pl.seed_everything(3)
    cb = RNNViz(every_n_steps=1, background="thread", strict=True)
    trainer = _fit(tmp_path, "process", TinySeqModel(), cb, loader())
    assert cb.placement == "thread" and cb.drawer_peak_rss_mb > 0
    pictures = _everything(trainer)
    assert [step for step, _ in pictures["rnnviz/hidden/rnn"]] == list(range(trainer.global_step))


@pytest.mark.parametrize("device_s", [None, 0.0125])
def test_a_recordings_device_span_is_logged_where_there_is_one(monkeypatch, device_s):
    """``rnnviz/overhead/device_ms`` beside the other costs of a recording finished on a CUDA stream of
    the worker's (``Delivery.device_s``), and not at all elsewhere."""
    from lightning_rnnviz.pipeline.recorder import Recorder
    from lightning_rnnviz.pipeline.worker import Delivery
    from lightning_rnnviz.render.report import Guard

    written: list = []

    class Fanout:
        def deliver(self, items, beside_training):
            pass

        def scalars(self, values, step):
            written.append((dict(values), step))

        def flush(self):
            pass

    class Finished:
        waited_s = 0.0

        def ready(self):
            delivery = Delivery(9)
            delivery.worker_s, delivery.device_s = 0.05, device_s
            return [delivery]

    monkeypatch.setattr(Recorder, "overhead_wanted", property(lambda self: True))
    recorder = Recorder()
    recorder.guard, recorder.fanout = Guard("RNNViz", strict=True), Fanout()
    recorder.deliver(Finished(), strict=True, cadence=50)
    [(values, step)] = written
    assert step == 9 and values["rnnviz/overhead/offthread_ms"] == pytest.approx(50)
    if device_s is None:
        assert not [tag for tag in values if "device" in tag]
    else:
        assert values["rnnviz/overhead/device_ms"] == pytest.approx(12.5)


def test_a_recording_reaches_the_records_keeper_whole_while_training_flushes(tmp_path, monkeypatch):
    """On the worker, a recording's pictures, statistics and ``save_records="full"`` tensors reach the
    records keeper in one hold of the output's lock. A flush from the training thread in between (an epoch
    end's, a delivery's) wrote part of the step; when the rest then crossed ``save_records_max_mb``, that
    part stayed on disk: with delays injected, ``tests/callbacks/test_offline.py``'s bound test saved steps
    ``[0, 1, 3]`` in 2 of 4 fits (the likely cause of its one failure, whose message was lost)."""
    from types import SimpleNamespace

    import numpy as np

    from lightning_rnnviz.pipeline.drawing import InlineRenderer
    from lightning_rnnviz.pipeline.fanout import Fanout
    from lightning_rnnviz.pipeline.recorder import Recorder
    from lightning_rnnviz.pipeline.records import RecordKeeper
    from lightning_rnnviz.probe.records import Recording
    from lightning_rnnviz.render.jobs import Job
    from lightning_rnnviz.render.report import Guard
    from tests.render.conftest import make_rnn

    warned = []
    keeper = RecordKeeper(tmp_path, full=True, max_mb=0.01, warn=warned.append)  # 10 KiB
    recorder = Recorder()
    recorder.guard = Guard("RNNViz", strict=True)
    recorder.fanout = Fanout([], InlineRenderer(), recorder.guard, keeper)
    recorder.members = [SimpleNamespace(watched={"rnn"})]
    delivery = Delivery(3)
    job = Job("hidden", {"values": np.zeros(4, np.float32)}, "rnnviz/hidden/rnn", 3)
    delivery.items = [("picture", (job, None)), ("scalars", ({"rnnviz/grad_norm/rnn/mean": 0.5}, 3))]
    record = make_rnn("LSTM", layers=2, time=40, hidden=16)  # about 40 KiB of noise: past the bound
    delivery.recording = Recording({"rnn": record})

    flusher: list[threading.Thread] = []
    deliver = recorder.fanout.deliver

    def then_the_training_thread_flushes(items, beside_training):
        deliver(items, beside_training)
        flusher.append(threading.Thread(target=recorder.fanout.flush))
        flusher[0].start()
        flusher[0].join(timeout=1.0)  # it goes through at once unless the worker still holds the lock

    monkeypatch.setattr(recorder.fanout, "deliver", then_the_training_thread_flushes)
    recorder.write_beside(delivery)
    flusher[0].join()
    keeper.close()
    assert keeper.skipped_from == 3 and len(warned) == 1
    assert not list((tmp_path / "records").glob("*.npz"))  # the step crossed the bound whole: nothing of it


@pytest.mark.filterwarnings("ignore:.*TensorBoard keeps 10 images.*")
def test_the_worker_writes_the_records_files_and_the_training_thread_only_at_fit_end(tmp_path, monkeypatch):
    """``save_records="full"`` with the recording worker: compressing a step's file (the better part of a
    second for a large LSTM) happens on the worker; the training thread writes only what is left at fit
    end. The files hold what the training thread's route keeps, the training thread's own statistics (the
    overhead scalars) included."""
    from lightning_rnnviz import load_records
    from lightning_rnnviz.pipeline.fanout import Fanout
    from lightning_rnnviz.pipeline.records import RecordKeeper

    writes, closing = [], []
    flush, close = RecordKeeper.flush, Fanout.close

    def noted_flush(self):
        if self._step is not None and not self._pending.empty():
            writes.append((threading.current_thread() is threading.main_thread(), bool(closing), self._step))
        flush(self)

    def noted_close(self, *args, **kwargs):
        closing.append(True)
        close(self, *args, **kwargs)

    monkeypatch.setattr(RecordKeeper, "flush", noted_flush)
    monkeypatch.setattr(Fanout, "close", noted_close)
    runs = {}
    for background in (False, "thread"):
        writes.clear()
        closing.clear()
        torch.manual_seed(0)
        callback = RNNViz(every_n_steps=2, histograms=False, strict=True, save_records="full", scalars="all",
                          background=background)
        trainer = _fit(tmp_path, str(background), TinySeqModel(), callback, loader(), log_every_n_steps=2)
        runs[background] = load_records(trainer.logger.log_dir)
        if background:
            assert writes and all(not main or at_end for main, at_end, _ in writes), writes
            assert any(not main for main, _, _ in writes)
    inline, beside = runs[False], runs["thread"]
    assert [s.step for s in beside] == [s.step for s in inline] == [0, 1, 3, 4, 5, 7, 8]
    for here, there in zip(inline, beside):
        assert set(here.payloads) == set(there.payloads) and set(here.records) == set(there.records)
        assert set(here.stats) <= set(there.stats)  # the overhead scalars too (the worker's has two more)
        for tag, value in here.stats.items():
            if "overhead" not in tag:
                assert there.stats[tag] == value or (value != value and there.stats[tag] != there.stats[tag])
    assert {"rnnviz/overhead/train_thread_ms", "rnnviz/overhead/offthread_ms"} <= set(beside[0].stats)
