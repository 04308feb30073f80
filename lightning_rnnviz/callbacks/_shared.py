"""One recording per training batch for all monitors on a Trainer.

Several monitors (``RNNViz``, ``HiddenStateMonitor``, ...) on one Trainer share a single ``Probe`` and
a single ``record()`` block per batch, so the model is hooked and replayed once, not once per monitor.
The first monitor to see a batch opens the block for every monitor that wants that batch; the first
to see the end of the batch closes it.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from torch import nn

from lightning_rnnviz.pipeline.fanout import Fanout
from lightning_rnnviz.pipeline.worker import Report, Worker, hand_off
from lightning_rnnviz.probe import Capture, Probe, Recording


class Member(Protocol):
    """What the recorder reads of a monitor sharing it (an ``RNNViz``): which modules it watches and how
    a recording must be made for it. The recorder knows no more of the monitors than this."""

    enabled: bool
    modules: Sequence[str] | None
    attention: Mapping[str, Any] | None
    call: int | None
    strict: bool
    max_samples: int | None


class SharedRecorder:
    """Opens and closes the ``record()`` block of one batch for the monitors that asked for it."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.probe: Probe | None = None
        self._block: contextlib.ExitStack | None = None
        self._capture: Capture | None = None
        self._key: Any = None
        self._wanting: list[Member] = []
        self._result: Recording | None = None
        self.amp_scale: float | None = None
        self.fanout: Fanout | None = None  # one output over every logger, one renderer, for every member
        self.worker: Worker | None = None  # finishes recordings beside training (placement "thread")
        self.reported_wait_s = 0.0  # the worker's `waited_s` as last reported
        # what the budget reads: when training started, each recording's training-thread seconds, and
        # all the callback's training-thread seconds (epoch ends included)
        self.clock: float | None = None
        self.costs: list[float] = []
        self.spent_total_s = 0.0
        self.layout_written = False
        self.flush_next = False  # flush the loggers at the next batch start (the user's scalars of a recorded step)
        self.spent_s = 0.0  # time on the training thread for the current batch's recording
        self.replay_s = 0.0
        self._drawn_before = (0.0, 0.0)

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
        self._key, self._wanting, self._result = key, wanting, None
        if not wanting:
            return
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
        # what the recording cost this thread: the hooks' set-up and the hand-off (a wait for room in the
        # worker's queue is the worker's `waited_s`, reported on its own)
        handed.thread_s = self.spent_s + time.perf_counter() - started
        self.spent_s = 0.0
        self.worker.submit(handed)
        return True

    def release(self) -> None:
        """Let go of the batch's recording once every monitor has reported it: its records are the size of
        the model's activations, and on a GPU they are in device memory."""
        self._result = self._capture = None

    def abort(self) -> None:
        """Remove every hook without finishing the recording (exceptions, teardown)."""
        if self._block is not None:
            block, self._block = self._block, None
            with contextlib.suppress(Exception):
                block.__exit__(RuntimeError, RuntimeError("recording aborted"), None)
        self._key, self._wanting = None, []


_SHARED: weakref.WeakKeyDictionary[Any, SharedRecorder] = weakref.WeakKeyDictionary()


def shared_recorder(trainer: Any) -> SharedRecorder:
    """The recorder of ``trainer``, created on first use; it lives as long as the trainer."""
    recorder = _SHARED.get(trainer)
    if recorder is None:
        recorder = _SHARED[trainer] = SharedRecorder()
    return recorder

