"""The one owner of a Trainer's recordings, from the first hook to the last write.

Several monitors (``RNNViz``, ``HiddenStateMonitor``, ...) on one Trainer share one :class:`Recorder`: one
``Probe`` and one ``capture()`` block per batch, so the model is hooked and replayed once, not once per
monitor; one :class:`~lightning_rnnviz.pipeline.fanout.Fanout` over the Trainer's loggers; where a core is
spare, one :class:`~lightning_rnnviz.pipeline.worker.Worker` that finishes recordings beside training. The
first monitor to see a batch opens the block for every monitor that wants that batch; the first to see the
end of the batch closes it and hands it over (or finishes it on this thread). The Lightning callbacks
decide when to record and which loggers to write to; everything a recording then goes through is here.
The recorder reads of its monitors only what :class:`Member` declares, and no monitor writes its fields.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from torch import nn

from lightning_rnnviz.pipeline.drawing import BackgroundRenderer, DrawingProcess, InlineRenderer, NotReady
from lightning_rnnviz.pipeline.fanout import Fanout
from lightning_rnnviz.pipeline.records import RecordKeeper
from lightning_rnnviz.pipeline.worker import (
    Delivery,
    EpochEnd,
    Report,
    Worker,
    draw_here,
    give_warnings,
    hand_off,
)
from lightning_rnnviz.probe import Capture, Probe, Recording
from lightning_rnnviz.render.jobs import Job
from lightning_rnnviz.render.report import Guard
from lightning_rnnviz.sinks import Picture

RENDERERS_BY_PLACEMENT = {"process": BackgroundRenderer, "thread": InlineRenderer, "inline": InlineRenderer}


class Member(Protocol):
    """What the recorder reads of a monitor sharing it (an ``RNNViz``): which modules it watches and how
    a recording must be made for it. The recorder knows no more of the monitors than this."""

    enabled: bool
    modules: Sequence[str] | None
    attention: Mapping[str, Any] | None
    call: int | None
    strict: bool
    max_samples: int | None
    scalars: str  # "all": the recording's `rnnviz/overhead/*` scalars are written
    watched: set[str]  # the modules whose records the member reports


class Recorder:
    """Owns the recordings of one Trainer: the probe and its block per batch, the output over every
    logger, the worker, and what the recordings cost the training thread (for ``budget``).

    Its life: :meth:`open` (the first monitor, at fit start) and :meth:`join` (every monitor), then per
    recorded batch :meth:`begin` and either :meth:`hand_off` (worker) or :meth:`end` (this thread), the
    worker's results written by :meth:`deliver`; :meth:`leave` by every monitor, the last one closing the
    output, the worker and its drawing process, with the last recordings written, not lost.
    """

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.probe: Probe | None = None
        self._block: contextlib.ExitStack | None = None
        self._capture: Capture | None = None
        self._key: Any = None
        self._wanting: list[Member] = []
        self._result: Recording | None = None
        self.fanout: Fanout | None = None  # one output over every logger, one renderer, for every member
        self.worker: Worker | None = None  # finishes recordings beside training (placement "thread")
        self.reported_wait_s = 0.0  # the worker's `waited_s` as last reported
        # what the budget reads: when training started, each recording's training-thread seconds, and
        # all the callback's training-thread seconds (epoch ends included)
        self.clock: float | None = None
        self.costs: list[float] = []
        self.spent_total_s = 0.0
        # the cost scalars' own writes and the loggers' flushes after recordings: in no `train_thread_ms`
        self.flushes_s = 0.0
        self.layout_written = False
        self.flush_next = False  # flush the loggers at the next batch start (the user's scalars of a recorded step)
        self.spent_s = 0.0  # time on the training thread for the current batch's recording
        self.replay_s = 0.0
        self._drawn_before = (0.0, 0.0)
        self.guard: Guard | None = None  # the opening monitor's: warns and counts errors of shared writes
        self.drawing: DrawingProcess | None = None  # draws the worker's pictures
        self.drawing_peak_rss_mb: float | None = None  # the drawing process's, once closed
        self.lines: list[str] = []  # console lines of the epoch ends the worker finished, for the callback to say

    # --- members and output ------------------------------------------------------------------------
    def join(self, member: Member) -> None:
        """``member`` records from now on (last in the order the batch's work goes round)."""
        self.members = [m for m in self.members if m is not member] + [member]
        self.probe = None  # rebuilt for the current members

    def open(self, sinks: Sequence[Any], placement: str, guard: Guard, keeper: RecordKeeper | None) -> None:
        """One output over ``sinks``, drawing where ``placement`` says (``"inline"``, ``"thread"``: the
        worker, which also closes the epochs and writes the records keeper's files, ``"process"``: a
        drawing process)."""
        self.guard, self.drawing_peak_rss_mb = guard, None
        self.fanout = Fanout(sinks, RENDERERS_BY_PLACEMENT[placement](), guard, keeper,
                             records_beside=placement == "thread")
        if placement == "thread":
            try:
                self.drawing = DrawingProcess()
            except OSError as error:
                guard.problem("start the drawing process", error)
            self.worker = Worker(keep_recordings=keeper is not None and keeper.full, beside=self.write_beside,
                                 wants_histograms=self.fanout.wants_histograms, drawer=self._draw)

    def _draw(self, job: Job) -> Picture:
        """On the worker: ``job`` drawn by the drawing process, or by the worker itself while that process
        is starting and once it is gone (said once)."""
        drawing = self.drawing
        if drawing is not None:
            try:
                return drawing.draw(job)
            except NotReady:
                pass  # still starting: this one is drawn here
            except BrokenPipeError as error:
                self._close_drawing()
                self.guard.once("drawing process", f"{self.guard.owner}: {error}; the recording worker draws the "
                                "pictures itself from now on.")
        return draw_here(job)

    def _close_drawing(self) -> None:
        drawing, self.drawing = self.drawing, None
        if drawing is not None:
            self.guard.run("stop the drawing process", drawing.close)
            self.drawing_peak_rss_mb = drawing.peak_rss_mb

    def drop_worker(self) -> None:
        """Finish recordings on the training thread from now on (the worker's core turned out busy)."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.close()
        self._close_drawing()

    def leave(self, member: Member, strict: bool, cadence: int | None) -> Fanout | None:
        """``member`` stops recording: the recordings handed over for it are finished first. When it was
        the last, the output is closed (the worker's last recordings written) and returned, for the
        caller to report on; else ``None``."""
        self.abort()
        was_member = member in self.members
        if was_member and self.worker is not None:
            self.worker.wait(timeout=60.0)
        remaining = [m for m in self.members if m is not member]
        self.probe = None
        fanout = self.fanout
        if not was_member or remaining or fanout is None:
            self.members = remaining
            return None
        worker, self.worker = self.worker, None
        try:
            if worker is not None:  # finished above: the last recordings are written, not lost, with the
                worker.close()  # leaving member's settings (its `scalars`) still in force
                self.deliver(worker, strict, cadence)  # with `strict`, a recording's error is raised here
        finally:  # and everything is closed all the same
            self.members = remaining
            self._close_drawing()
            self.fanout, self.layout_written, self.clock = None, False, None
            fanout.close()  # the drawing process finishes what it was handed, then every sink is closed
        return fanout

    def batch_start(self) -> None:
        """At a training batch start: the worker starts on a recording held for it (see
        :meth:`~lightning_rnnviz.pipeline.worker.Worker.submit`), and, after a recorded step, every logger
        is flushed. Lightning writes a step's ``self.log`` scalars after the callbacks' batch end, so the
        user's scalars show live with the pictures of their step; not while the worker writes (then at the
        next batch)."""
        if self.worker is not None:
            self.worker.go()
        if self.flush_next and self.fanout is not None:
            started = time.perf_counter()
            flushed = self.guard.run("flush", self.fanout.flush, only_if_free=self.worker is not None)
            self.flush_next = flushed is False
            self.flushes_s += time.perf_counter() - started

    # --- what the recordings cost the training thread ----------------------------------------------
    def start_clock(self) -> bool:
        """Start the budget's clock with training, once; whether this call started it."""
        if self.clock is not None:
            return False
        self.clock, self.costs, self.spent_total_s, self.flushes_s = time.perf_counter(), [], 0.0, 0.0
        return True

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of the training thread's work on the current batch's recording."""
        self.spent_s += seconds

    def spend(self, seconds: float, recording: bool) -> None:
        """Count what a recording (or an epoch end) cost the training thread."""
        if recording:
            self.costs.append(seconds)
        self.spent_total_s += seconds

    @property
    def overhead_wanted(self) -> bool:
        """Whether the ``rnnviz/overhead/*`` scalars are written: some member has ``scalars="all"``."""
        return any(member.scalars == "all" for member in self.members)

    def build_probe(self, model: nn.Module) -> Probe:
        """One probe over the union of what the members watch (``None`` in any member means all)."""
        members = [m for m in self.members if m.enabled]
        if any(m.modules is None for m in members):
            modules = None
        else:
            modules = sorted({name for m in members for name in m.modules})
        attention: dict[str, Callable] = {}
        for member in members:
            attention.update(member.attention or {})
        call = next((m.call for m in members if m.call is not None), None)
        # Records stay where the model ran: statistics, histograms and picture payloads are reduced there.
        return Probe(model, modules=modules, attention=attention, strict=any(m.strict for m in members), call=call,
                     on_device=True)

    def begin(self, key: Any, model: nn.Module, wanting: list[Member]) -> None:
        """Open the block for batch ``key`` unless it is open already or nobody wants it; it records as
        many sequences as the most demanding member asks for."""
        if key == self._key:
            return
        samples = [m.max_samples for m in wanting]
        max_samples = None if None in samples else max(samples, default=None)
        self.abort()
        self._result = None
        if not wanting:
            return
        self._key, self._wanting = key, wanting
        started = time.perf_counter()
        self.spent_s = self.replay_s = 0.0
        self._drawn_before = self.drawing_s()
        if self.probe is None:
            self.probe = self.build_probe(model)
        self._block = contextlib.ExitStack()
        self._capture = self._block.enter_context(self.probe.capture(max_samples=max_samples))
        self.spent_s += time.perf_counter() - started

    def drawing_s(self) -> tuple[float, float]:
        """Seconds spent on this thread so far drawing, and encoding and writing pictures and statistics
        (drawing and encoding are zero when a child process does them)."""
        if self.fanout is None:
            return 0.0, 0.0
        renderer = self.fanout.renderer
        return renderer.render_s, renderer.encode_s + self.fanout.write_s

    def drawing_since_begin(self) -> tuple[float, float]:
        """``(render, write)`` seconds on this thread since the current batch's block opened."""
        (render_now, write_now), (render_then, write_then) = self.drawing_s(), self._drawn_before
        return render_now - render_then, write_now - write_then

    @property
    def is_open(self) -> bool:
        return self._block is not None

    @property
    def holds_batch(self) -> bool:
        """Whether a batch's recording is open or finished and not yet let go (:meth:`release`): when not,
        a batch nobody records needs neither :meth:`begin` nor :meth:`end`."""
        return self._key is not None

    def end(self, key: Any, grad_scale: float | None) -> tuple[Recording | None, list[Member]]:
        """Close the block of batch ``key`` (once) and return its recording and who wanted it."""
        if key != self._key:
            return None, []
        if self._block is not None:
            block, self._block = self._block, None
            started = time.perf_counter()
            block.close()
            capture, self._capture = self._capture, None
            self._result = capture.finish(grad_scale)
            self.replay_s = time.perf_counter() - started
            self.spent_s += self.replay_s
        return self._result, self._wanting

    def hand_off(self, key: Any, grad_scale: float | None, reports: Callable[[list[Member]], list[Report]],
                 step: int, prefix: str) -> bool:
        """The worker's route: close the block of batch ``key`` (its hooks go) and hand the capture over,
        with ``reports(wanting)``, to be finished beside training; whether there was one to hand over."""
        if key != self._key or self._block is None:
            return False
        started = time.perf_counter()
        block, self._block = self._block, None
        block.close()
        capture, self._capture = self._capture, None
        handed = hand_off(capture, grad_scale, reports(self._wanting), step, prefix)
        self._key, self._wanting = None, []  # the worker's now
        # what the recording cost this thread: the hooks' set-up and the hand-off (a wait for room in the
        # worker's queue is the worker's `waited_s`, reported on its own)
        handed.thread_s = self.spent_s + time.perf_counter() - started
        self.spent_s = 0.0
        # without a CUDA event (the CPU) the worker starts at the next batch start (`batch_start`), not in
        # the loop's Python between the steps; on CUDA at once, where that stretch waits for the device
        # without the GIL
        self.worker.submit(handed, hold=handed.event is None)
        return True

    def end_epoch(self, close: Callable[[Delivery], list[str]], draw: Callable[[Delivery], bool],
                  step: int) -> None:
        """The worker's route at a training epoch's end: ``close`` and then ``draw`` (a monitor's epoch end,
        see :class:`EpochEnd`) run on the worker after the epoch's recordings; what they write comes back
        with them (:meth:`deliver`)."""
        self.worker.submit(EpochEnd(close, draw, step))

    def take_lines(self) -> list[str]:
        """The console lines delivered since the last call (findings that appeared or cleared)."""
        lines, self.lines = self.lines, []
        return lines

    def release(self) -> None:
        """Let go of the batch's recording once every monitor has reported it: its records are the size of
        the model's activations, and on a GPU they are in device memory."""
        self._result = self._capture = None
        self._key, self._wanting = None, []

    def abort(self) -> None:
        """Remove every hook without finishing the recording (exceptions, teardown)."""
        if self._block is not None:
            block, self._block = self._block, None
            with contextlib.suppress(Exception):
                block.__exit__(RuntimeError, RuntimeError("recording aborted"), None)
        self._key, self._wanting = None, []


    # --- writing -----------------------------------------------------------------------------------
    def write_layout(self, charts: Callable[[], Mapping[str, Mapping[str, list[str]]]]) -> None:
        """The Custom Scalars layout, ``charts()``, once, at the first recording (by then every monitor
        has started)."""
        if self.layout_written:
            return
        self.layout_written = True
        self.guard.run("write the chart layout", self.fanout.layout, charts())

    def keep_full(self, recording: Recording, step: int, prefix: str) -> None:
        """``save_records="full"``: keep every member's records of ``recording`` (once per recording)."""
        keeper = self.fanout.keeper
        if keeper is None or not keeper.full:
            return
        names = set().union(*(m.watched for m in self.members))
        mine = {n: r for n, r in recording.items() if n in names}
        with self.fanout.lock:
            self.guard.run("keep the records", keeper.full_records, mine, step, prefix)

    def write_beside(self, delivery: Delivery) -> None:
        """On the worker, once a recording is finished: write it where that may be done beside training
        (our TensorBoard file, the records keeper, ``save_records="full"``'s tensors included, in the order
        the training thread's route writes them). First what needs not the output's lock (MLflow's
        pictures), so the training thread never waits for it; then one hold of the lock: a flush from the
        training thread in between would write part of the step to the records keeper, and a size bound
        crossed by the rest would leave that part on disk."""
        recording, delivery.recording = delivery.recording, None
        self.fanout.deliver_unlocked(delivery.items)
        with self.fanout.lock:
            self.fanout.deliver(delivery.items, beside_training=True)
            if recording is not None:
                self.keep_full(recording, delivery.step, delivery.prefix)

    def deliver(self, worker: Worker, strict: bool, cadence: int | None) -> list[tuple[float, bool]]:
        """Write what ``worker`` has finished to every logger, here on the training thread: its held
        warnings given, an error raised with ``strict`` (else warned once and counted), then pictures,
        statistics and histograms, and what each recording cost; an epoch end's console lines are kept for
        :meth:`take_lines`. Returns ``(training-thread seconds, whether a recording)`` of each training
        recording and each epoch end that drew (the budget's): what its scalars say, and their own writing
        and the flush after them, which they cannot hold (kept in :attr:`flushes_s`)."""
        spent = []
        for delivery in worker.ready():
            started = time.perf_counter()
            give_warnings(delivery)
            if delivery.error is not None:
                if strict:
                    raise delivery.error
                self.guard.problem("record", delivery.error)
            fanout, cost = self.fanout, None
            fanout.deliver(delivery.items, beside_training=False)  # the worker wrote the others' already
            self.lines += delivery.lines
            write_s = time.perf_counter() - started
            if delivery.epoch_end:
                if delivery.drawn:
                    if self.overhead_wanted:
                        self.guard.run("overhead statistics", fanout.scalars, {
                            "rnnviz/overhead/epoch_end_ms": 1e3 * (delivery.thread_s + write_s),
                            "rnnviz/overhead/epoch_end_offthread_ms": 1e3 * delivery.worker_s,
                        }, delivery.step)
                    cost = (delivery.thread_s + write_s, False)
            elif delivery.prefix == "rnnviz":
                waited_s, self.reported_wait_s = worker.waited_s - self.reported_wait_s, worker.waited_s
                if self.overhead_wanted:
                    costs = {
                        "rnnviz/overhead/train_thread_ms": 1e3 * (delivery.thread_s + write_s + waited_s),
                        "rnnviz/overhead/offthread_ms": 1e3 * delivery.worker_s,
                        "rnnviz/overhead/replay_ms": 1e3 * delivery.replay_s,
                        "rnnviz/overhead/render_ms": 1e3 * delivery.draw_s,
                        "rnnviz/overhead/write_ms": 1e3 * write_s,
                        "rnnviz/overhead/wait_ms": 1e3 * waited_s,
                        "rnnviz/overhead/dropped_figures": 0.0,
                        "rnnviz/overhead/every_n_steps": float(cadence or 0),
                    }
                    if delivery.device_s is not None:
                        costs["rnnviz/overhead/device_ms"] = 1e3 * delivery.device_s
                    self.guard.run("overhead statistics", fanout.scalars, costs, delivery.step)
                cost = (delivery.thread_s + write_s + waited_s, True)
            if delivery.items or not delivery.epoch_end:
                self.guard.run("flush", fanout.flush)
                self.flush_next = True
            after_s = time.perf_counter() - started - write_s
            self.flushes_s += after_s
            if cost is not None:
                spent.append((cost[0] + after_s, cost[1]))
        return spent

    def finish_inline(self, step: int, cadence: int | None) -> float:
        """After the last member reported a recording finished on this thread: the drawing process's errors
        are the caller's to report; this writes what the recording cost, flushes every logger and lets the
        recording go. Returns its training-thread seconds (the budget's), that writing and flush included
        (which the scalars cannot hold: kept in :attr:`flushes_s`)."""
        started = time.perf_counter()
        fanout = self.fanout
        render_s, write_s = self.drawing_since_begin()
        if self.overhead_wanted:
            self.guard.run("overhead statistics", fanout.scalars, {
                "rnnviz/overhead/train_thread_ms": 1e3 * self.spent_s,
                "rnnviz/overhead/replay_ms": 1e3 * self.replay_s,
                "rnnviz/overhead/render_ms": 1e3 * render_s,
                "rnnviz/overhead/write_ms": 1e3 * write_s,
                "rnnviz/overhead/dropped_figures": float(fanout.renderer.dropped),
                "rnnviz/overhead/every_n_steps": float(cadence or 0),
            }, step)
        self.guard.run("flush", fanout.flush)
        self.flush_next = True
        self.release()  # every monitor has it: its tensors (device memory on a GPU) go now
        after_s = time.perf_counter() - started
        self.flushes_s += after_s
        return self.spent_s + after_s


_RECORDERS: weakref.WeakKeyDictionary[Any, Recorder] = weakref.WeakKeyDictionary()


def recorder_of(trainer: Any) -> Recorder:
    """The recorder of ``trainer``, created on first use; it lives as long as the trainer."""
    recorder = _RECORDERS.get(trainer)
    if recorder is None:
        recorder = _RECORDERS[trainer] = Recorder()
    return recorder

