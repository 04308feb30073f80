"""A recording's route when cores are spare: only the capture on the training thread, the rest beside it.

    training thread:  capture (hooks) -> hand-off (copies, dropout masks, an event)  ...  deliver
    worker thread:                                  replay -> reduce -> (wait)
    drawing process:                                                    draw -> encode

The training thread keeps what must happen there: the hooks during the user's forward and backward, and
at the end of the recorded step the hand-off (:meth:`~lightning_rnnviz.probe.Capture.hand_off`: copies of
the tensors the capture only referenced, the dropout masks drawn from the generator states of the calls,
the user's ``labels(batch)``) and, on CUDA, an event on its stream. The worker finishes the recording
(the replay for the exact ``dL/dh_t``; on the CPU from the training thread's next batch start, see
:meth:`Worker.submit`) and reduces it to statistics, histograms and picture payloads;
each picture is drawn and encoded by a drawing process the worker waits for (painting holds the GIL,
which the training thread needs: see :class:`~lightning_rnnviz.pipeline.drawing.DrawingProcess`), or by
the worker itself where that process cannot run; on CUDA the worker works on a stream
of its own that waits for that event, so nothing on the training thread waits for the device. What the
worker made is a :class:`Delivery`: the worker writes it where that may be done beside training (our
TensorBoard file, the records kept), and the training thread writes it to the other loggers at its next
hook, so that the APIs of the user's logger objects are called from the thread that owns them.

The worker touches nothing the training thread sees: no warning filter (its warnings are held and given
by the training thread, :mod:`lightning_rnnviz.probe.held`), no random generator (the masks were drawn
at the hand-off), no TF32 or other backend flag; its intra-op thread count is its own
(:func:`one_thread`). At most ``max_pending`` recordings wait beside the one it works on; the hand-off of
another waits for room, so that every recording is written. A training epoch's end (:class:`EpochEnd`:
findings, summary, ``grad_decay``) is queued behind the epoch's recordings and finished here too, so the
training thread neither waits for them nor draws at the epoch's end. A reader of the state that recordings
and epoch ends add to (a checkpoint) waits only until that state is complete (:meth:`Worker.wait_settled`),
not for the epoch's pictures.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_rnnviz.probe import Capture, Recording
from lightning_rnnviz.probe.held import Held, give, held
from lightning_rnnviz.render.jobs import Job, draw
from lightning_rnnviz.sinks.base import Picture

_OPENMP_NAMES = ("libgomp", "libiomp5", "libomp")  # GNU's, Intel's and LLVM's OpenMP runtimes


@functools.cache
def _openmp() -> Any | None:
    """The OpenMP runtime that torch runs its intra-op threads on, opened with ``ctypes`` if this process
    has loaded it already (never loaded here), or ``None``: another parallel backend, or none found.

    Checked, not guessed: a runtime qualifies when a count set through it for this thread is what
    ``torch.get_num_threads()`` then reads (the count is set back at once).
    """
    paths = []
    with contextlib.suppress(OSError):
        folder = os.path.join(os.path.dirname(torch.__file__), "lib")  # pip wheels bring their own
        paths += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith(_OPENMP_NAMES)]
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        paths += sorted({p for p in (line.split()[-1] for line in maps if "/" in line)
                         if os.path.basename(p).startswith(_OPENMP_NAMES)})
    for path in paths:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
            lib.omp_get_max_threads.restype = ctypes.c_int
            before = lib.omp_get_max_threads()
        except (OSError, AttributeError):
            continue
        if torch.get_num_threads() != before:
            continue  # not the runtime torch reads its count from
        trial = 1 if before > 1 else 2
        lib.omp_set_num_threads(trial)
        try:
            if torch.get_num_threads() == trial:
                return lib
        finally:
            lib.omp_set_num_threads(before)
    return None


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the callback's CPU-side reductions on one intra-op thread; the thread's count comes back after.

    They are many small operations: on a many-core machine each would wake the whole intra-op pool
    (about 1 ms an operation was measured on a 16-core GPU host), which costs far more than the work.

    Not with ``torch.set_num_threads``: that call, even with the count unchanged, left every later
    training step of the user's 4-7 % slower here (fast-step; a change of the count and back, 6-14 %),
    and PyTorch keeps the count as set by the user from then on. The OpenMP runtime's own
    ``omp_set_num_threads`` changes only the calling thread's count, which is exactly restored. Where
    torch runs on another parallel backend, nothing is changed and the reductions use the user's threads.
    """
    lib = _openmp()
    threads = lib.omp_get_max_threads() if lib is not None else 1
    if threads < 2:
        yield
        return
    lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        lib.omp_set_num_threads(threads)


# --- what a worker gets and gives back -----------------------------------------------------------------
Report = Callable[[Recording, "Delivery"], None]


@dataclass
class Handed:
    """One recording handed to the worker.

    Attributes:
        capture: what the hooks caught, handed off (see :meth:`~lightning_rnnviz.probe.Capture.hand_off`).
        grad_scale: what the loss behind the recorded gradients was multiplied by, or ``None``.
        reports: each turns the finished recording into pictures, statistics and histograms on the
            delivery it is given (one per monitor that wanted the batch).
        step: the step everything is logged at.
        prefix: ``"rnnviz"`` for a training batch, ``"rnnviz/val"`` for the validation sample.
        held_tensors: the tensors the capture holds (on CUDA they are marked used on the worker's stream).
        event: on CUDA, recorded on the training thread's stream after the hand-off; else ``None``.
        thread_s: what the recording has cost the training thread so far.
    """

    capture: Capture
    grad_scale: float | None
    reports: list[Report]
    step: int
    prefix: str = "rnnviz"
    held_tensors: list[torch.Tensor] = field(default_factory=list)
    event: Any = None
    thread_s: float = 0.0


@dataclass
class EpochEnd:
    """A training epoch's end, handed to the worker after the epoch's recordings, so that the training
    thread neither waits for them nor draws the epoch's pictures.

    Attributes:
        close: stores the epoch's curves and statistics and writes its findings and summary to the delivery
            it is given; returns the console lines to say
            (:meth:`~lightning_rnnviz.render.report.Reporter.close_epoch`).
        draw: then draws the epoch's pictures into the delivery; returns whether it drew anything
            (:meth:`~lightning_rnnviz.render.report.Reporter.draw_epoch`). It changes no state a checkpoint
            saves, so :meth:`Worker.wait_settled` does not wait for it.
        step: the step everything is logged at.
    """

    close: Callable[[Delivery], list[str]]
    draw: Callable[[Delivery], bool]
    step: int


def draw_here(job: Job) -> Picture:
    """``job`` drawn and PNG-encoded on this thread."""
    return Picture.from_rgb(draw(job))


class Delivery:
    """What the worker made of one recording, for the training thread to write: it takes what a
    :class:`~lightning_rnnviz.render.report.Reporter` sends (pictures, which it draws and encodes at once,
    scalars, histograms, which it counts at once, texts, documents, probe sets) and keeps it, in order.

    Attributes:
        step, prefix: the recording's step and prefix (see :class:`Handed`).
        items: ``(kind, args)`` in the order they came: ``("picture", (job, picture))``, ``("scalars",
            (values, step))``, ``("histogram", (tag, buckets, step))``, ``("text", ...)``, ``("document", ...)``,
            ``("probe_set", (tag, blob, step))``.
        warnings: the warnings the work gave, held for the training thread.
        error: an error that stopped the work (with ``strict``, re-raised by the training thread).
        recording: the finished recording, where the caller asked to keep it (``save_records="full"``).
        epoch_end: whether this is an epoch's end (:class:`EpochEnd`), not a recording; ``drawn`` whether it
            drew anything, ``lines`` the console lines it has to say (findings that appeared or cleared).
        thread_s, replay_s, draw_s, worker_s: the training thread's seconds before the hand-off, the
            replay's, drawing and encoding, and the worker's whole time on this recording.
        device_s: on CUDA, the recording's span on the worker's stream, from the hand-off's point to the
            end of its last operation there (:class:`DeviceSpan`); ``None`` elsewhere.
    """

    def __init__(self, step: int, prefix: str = "rnnviz", wants_histograms: bool = True,
                 drawer: Callable[[Job], Picture] | None = None, written: set[tuple[str, int]] | None = None) -> None:
        self.step, self.prefix = step, prefix
        self.drawer = drawer or draw_here
        self.wants_histograms = wants_histograms
        self.items: list[tuple[str, tuple]] = []
        self.warnings: Held = []
        self.error: BaseException | None = None
        self.recording: Recording | None = None
        self.epoch_end = self.drawn = False
        self.lines: list[str] = []
        self.thread_s = self.replay_s = self.draw_s = self.worker_s = 0.0
        self.device_s: float | None = None
        # (tag, step) of the pictures, texts, documents and probe sets taken: the first monitor's is kept (an
        # epoch's ends, one per monitor, share one set)
        self._drawn: set[tuple[str, int]] = set() if written is None else written

    def picture(self, job: Job) -> None:
        if not self._first(job.tag, job.step):
            return  # two monitors of one module: drawn once
        started = time.perf_counter()
        picture = self.drawer(job)
        self.draw_s += time.perf_counter() - started
        self.items.append(("picture", (job, picture)))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.items.append(("scalars", (dict(values), step)))

    def histogram(self, tag: str, buckets: Callable[[], Mapping[str, Any] | None], step: int) -> None:
        if self.wants_histograms:
            counted = buckets()  # where the record lives, on the worker
            self.items.append(("histogram", (tag, counted, step)))

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self._first(tag, step):
            self.items.append(("text", (tag, markdown, step)))

    def document(self, name: str, data: Mapping[str, Any] | str, step: int) -> None:
        if self._first(name, step):
            self.items.append(("document", (name, data, step)))

    def probe_set(self, tag: str, blob: bytes, step: int) -> None:
        if self._first(tag, step):
            self.items.append(("probe_set", (tag, blob, step)))

    def _first(self, tag: str, step: int) -> bool:
        """Whether ``tag`` is new at ``step`` (two monitors: the first one's is kept, as the fan-out does)."""
        if (tag, step) in self._drawn:
            return False
        self._drawn.add((tag, step))
        return True


# --- the worker -----------------------------------------------------------------------------------------
class Worker:
    """One thread that finishes recordings and epoch ends handed to it, in order, beside training.

    Args:
        max_pending: recordings that may wait beside the one being worked on; :meth:`submit` waits for
            room beyond that (an epoch's end never waits: it holds no tensors).
        keep_recordings: keep each finished recording on its delivery (for ``save_records="full"``).
        beside: called on the worker with each finished delivery, to write it where that may be done
            beside training (see :meth:`~lightning_rnnviz.pipeline.fanout.Fanout.deliver`).
        wants_histograms: whether some sink keeps histograms (else they are not counted).
        drawer: draws and encodes a picture (by default on the worker itself, :func:`draw_here`; the
            recorder gives it a drawing process's).
    """

    HOLD_S = 0.5  # the longest a recording handed over with `hold` waits for `go`

    def __init__(self, max_pending: int = 1, keep_recordings: bool = False,
                 beside: Callable[[Delivery], None] | None = None, wants_histograms: bool = True,
                 drawer: Callable[[Job], Picture] | None = None) -> None:
        self._max_pending = max_pending
        self._drawer = drawer
        self._histograms = wants_histograms
        self._keep = keep_recordings
        self._beside = beside
        self._queue: collections.deque[Handed | EpochEnd | None] = collections.deque()
        self._done: collections.deque[Delivery] = collections.deque()
        self._busy = 0  # handed and not yet delivered to `_done`
        self._unsettled = 0  # handed and still to change what they add to (all but an epoch end's drawing)
        self._recordings = 0  # of those, recordings (what `max_pending` bounds)
        self._lock = threading.Condition()
        self._held = False  # the last recording handed over waits for `go` (see `submit`)
        self._closed = False
        self._stream: Any = None
        self._ended: tuple[int, set[tuple[str, int]]] = (-1, set())  # what the ends of the last epoch took
        self.waited_s = 0.0  # training-thread time spent in `submit` waiting for room (`wait` is the caller's)
        self._thread = threading.Thread(target=self._loop, name="rnnviz-worker", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        return self._busy == 0

    def submit(self, handed: Handed | EpochEnd, hold: bool = False) -> None:
        """Hand a recording or an epoch's end over; a recording waits only while ``max_pending`` recordings
        are waiting already.

        ``hold``: the worker starts on it only at :meth:`go` (the training thread's next batch start), or
        after :attr:`HOLD_S` seconds without one. The training loop's own Python between two steps (a
        logging step's logging, fetching the next batch) holds the GIL, which the worker's work needs too:
        begun there, a recording made that stretch about 4 ms longer on the CPU (2 vCPUs, 2026-12-07); begun
        at the next batch start, where the training's kernels run without the GIL, it is as long as
        without the callback.
        Anything handed over, waited for or closed after it lets it go at once.
        """
        if self._closed:
            raise RuntimeError("the recording worker is closed")
        started = time.perf_counter()
        recording = isinstance(handed, Handed)
        with self._lock:
            self._let_go()  # what waits is let go before anything waits for it
            while recording and self._recordings > self._max_pending:
                self._lock.wait()
            self._busy += 1
            self._unsettled += 1
            self._recordings += recording
            self._queue.append(handed)
            self._held = hold
            self._lock.notify_all()
        self.waited_s += time.perf_counter() - started

    def go(self) -> None:
        """Let the worker start on what it was handed with ``hold`` (at once when nothing is held: this runs
        at every batch start)."""
        if self._held:
            with self._lock:
                self._let_go()

    def _let_go(self) -> None:
        """Under the lock: a recording held for :meth:`go` may start now."""
        self._held = False
        self._lock.notify_all()

    @property
    def has_ready(self) -> bool:
        """Whether a delivery is finished and not yet taken (:meth:`ready`)."""
        return bool(self._done)

    def ready(self) -> list[Delivery]:
        """The deliveries finished since the last call, in the order handed (never waits)."""
        items = []
        while self._done:
            items.append(self._done.popleft())
        return items

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every recording handed over is finished; whether it is (on the worker's own thread,
        whether it is already: that thread cannot wait for itself)."""
        return self._wait_until(lambda: self._busy == 0, timeout)

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Wait until every recording handed over is finished and every epoch's end closed (its curves,
        findings and summary stored; its pictures may still be drawing): what a checkpoint saves is then
        complete, and nothing the worker does until the next hand-off changes it. Whether it is (on the
        worker's own thread, whether it is already)."""
        return self._wait_until(lambda: self._unsettled == 0, timeout)

    def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        if threading.current_thread() is self._thread:
            return done()
        with self._lock:
            self._let_go()
            return self._lock.wait_for(done, timeout)

    def _settled(self) -> None:
        with self._lock:
            self._unsettled -= 1
            self._lock.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Finish what was handed over (at most ``timeout`` seconds), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._queue.append(None)
            self._let_go()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._queue))
                if self._held:
                    self._lock.wait_for(lambda: not self._held, self.HOLD_S)
                    self._held = False
                handed = self._queue.popleft()
            if handed is None:
                return
            recording = isinstance(handed, Handed)
            delivery = self._finish(handed) if recording else self._close_epoch(handed)
            del handed  # what the capture held (device memory on a GPU) goes now, not at the next recording
            with self._lock:
                self._done.append(delivery)
                self._busy -= 1
                self._unsettled -= recording  # an epoch's end settled before its drawing
                self._recordings -= recording
                self._lock.notify_all()

    def _finish(self, handed: Handed) -> Delivery:
        """The stages beside training: replay, then each monitor's reduction, drawing and encoding, and
        the writing that may be done beside training."""
        delivery = Delivery(handed.step, handed.prefix, self._histograms, self._drawer)
        delivery.thread_s = handed.thread_s
        started = time.perf_counter()
        with held() as kept:
            try:
                with one_thread(), self._on_own_stream(handed) as span:
                    recording = handed.capture.finish(handed.grad_scale)
                    delivery.replay_s = time.perf_counter() - started
                    for report in handed.reports:
                        report(recording, delivery)
                    if self._keep:
                        delivery.recording = recording
                del recording  # on a GPU, device memory: gone before the next recording is finished
                if span is not None:
                    delivery.device_s = span.seconds()
                if self._beside is not None:
                    self._beside(delivery)
            except Exception as error:  # noqa: BLE001 - given to the training thread, which decides
                delivery.error = error
        delivery.warnings = kept
        delivery.worker_s = time.perf_counter() - started
        return delivery

    def _close_epoch(self, end: EpochEnd) -> Delivery:
        """An epoch's end, after the epoch's recordings: its pictures (drawn like a recording's), findings
        and summary, and the writing that may be done beside training."""
        if self._ended[0] != end.step:  # the first monitor's end of this epoch
            self._ended = (end.step, set())
        delivery = Delivery(end.step, "rnnviz", self._histograms, self._drawer, written=self._ended[1])
        delivery.epoch_end = True
        started = time.perf_counter()
        with held() as kept:
            try:
                try:
                    with one_thread():
                        delivery.lines = end.close(delivery)
                finally:  # settled also when closing failed: a reader must not wait forever
                    self._settled()
                with one_thread():
                    delivery.drawn = end.draw(delivery)
                if self._beside is not None:
                    self._beside(delivery)
            except Exception as error:  # noqa: BLE001 - given to the training thread, which decides
                delivery.error = error
        delivery.warnings = kept
        delivery.worker_s = time.perf_counter() - started
        return delivery

    @contextlib.contextmanager
    def _on_own_stream(self, handed: Handed) -> Iterator[DeviceSpan | None]:
        """On CUDA: a stream of the worker's, ordered after the hand-off by its event; the handed tensors
        are marked used there, so that their memory is not given to the training stream while the worker
        still reads them. Gives the :class:`DeviceSpan` of the block's work there (``None`` off CUDA)."""
        if handed.event is None:
            yield None
            return
        # the device the model ran on (a thread's current device is its own: this one's is cuda:0)
        device = next(t.device for t in handed.held_tensors if t.is_cuda)
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        stream = self._stream
        stream.wait_event(handed.event)
        for tensor in handed.held_tensors:
            if tensor.is_cuda:
                tensor.record_stream(stream)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            span = DeviceSpan(stream)
            try:
                yield span
            finally:
                span.end()


class DeviceSpan:
    """A recording's span on the worker's CUDA stream, timed by two CUDA events there and read by the
    worker, never by the training thread: from where the stream starts on the recording (once the
    hand-off's point on the training stream is reached) to the end of its last operation. It includes the
    gaps where the stream waits for the worker's Python, so it bounds from above the device time the
    recording took beside training."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._start = torch.cuda.Event(enable_timing=True)
        self._stop = torch.cuda.Event(enable_timing=True)
        self._start.record(stream)

    def end(self) -> None:
        self._stop.record(self._stream)

    def seconds(self) -> float:
        """The span, once the stream has reached its end (waits for that on this thread)."""
        self._stop.synchronize()
        return self._start.elapsed_time(self._stop) / 1e3


def give_warnings(delivery: Delivery) -> None:
    """Give the warnings the worker held, on this (the training) thread, where the user's filters act; each
    points at the user's class it is about, where one is known (:mod:`lightning_rnnviz.probe.held`)."""
    for message, category, where in delivery.warnings:
        give(message, category, where, stacklevel=3)


def hand_off(capture: Capture, grad_scale: float | None, reports: list[Report], step: int,
             prefix: str = "rnnviz") -> Handed:
    """On the training thread, right after the capture's block: make the capture its own and, on CUDA,
    mark the point on the current stream the worker's stream must wait for."""
    tensors = capture.hand_off()
    event = None
    cuda = [t for t in tensors if t.is_cuda]
    if cuda:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(cuda[0].device))
    return Handed(capture, grad_scale, reports, step, prefix, tensors, event)
