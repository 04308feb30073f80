"""One output for every logger of a Trainer: pictures drawn once, then written to each sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_rnnviz.pipeline.drawing import BackgroundRenderer, InlineRenderer
from lightning_rnnviz.pipeline.records import RecordKeeper
from lightning_rnnviz.render.jobs import Job
from lightning_rnnviz.sinks.base import Histogram, Sink

Guard = Callable[..., Any]  # guard(what, work, *args): runs work(*args) as the step named `what`


def _unguarded(what: str, work: Callable[..., Any], *args: Any) -> Any:
    return work(*args)


class Fanout:
    """Sends each picture, scalar, histogram, text and probe set to every sink; a failing sink never stops the others.

    Pictures go to the renderer first (drawn and encoded once); :meth:`drain` writes what it has drawn to
    every sink. A picture is drawn at most once per ``(tag, step)``, however many monitors ask for it.
    What the recording worker finished comes through :meth:`deliver`, from the worker to the sinks that may
    be written beside training, from the training thread to the others. Every write holds :attr:`lock`.

    Args:
        sinks: one per logger.
        renderer: draws the jobs (on this thread or in a child process).
        guard: ``guard(what, work, *args)`` runs each write, ``work(*args)``, as a step named ``what``, so
            that an error is warned and counted, not raised (:meth:`~lightning_rnnviz.render.report.Guard.run`).
        keeper: keeps what each step drew and measured (``save_records``), or ``None``.
        records_beside: the recording worker writes the keeper's files (compressing a step of full
            records takes the better part of a second): what the training thread gives the keeper waits for
            the worker's next delivery, and the training thread's flushes leave the keeper alone. A step's
            file is then written once a later step's data arrive (the next recording or epoch end), or at
            :meth:`close`.
    """

    def __init__(self, sinks: Sequence[Sink], renderer: InlineRenderer | BackgroundRenderer,
                 guard: Guard = _unguarded, keeper: RecordKeeper | None = None,
                 records_beside: bool = False) -> None:
        self.sinks = list(sinks)
        self.renderer = renderer
        self.guard = guard
        self.keeper = keeper  # keeps what each step drew and measured, for notebooks (`save_records`)
        self.records_beside = records_beside
        self._staged: list[tuple[Callable[..., None], tuple]] = []  # the training thread's, for the worker
        self.written: set[tuple[str, int]] = set()  # (tag, step) of pictures and texts handed over this run
        self.write_s = 0.0  # time spent writing to the sinks
        self._unflushed = False  # something was written since the last flush
        self.lock = threading.RLock()  # the recording worker writes too

    @property
    def wants_histograms(self) -> bool:
        return any(sink.wants_histograms for sink in self.sinks)

    def _each(self, what: str, method: str, *args: Any, sinks: Sequence[Sink] | None = None,
              locked: bool = True) -> None:
        """``sink.<method>(*args)`` on every sink (or on ``sinks``), each as a step ``"<what> to <sink>"``;
        under :attr:`lock` unless ``locked`` is false (see :meth:`deliver_unlocked`)."""
        targets = self.sinks if sinks is None else sinks
        if not targets:
            return
        if not locked:
            for sink in targets:
                self.guard(f"{what} to {sink.name}", getattr(sink, method), *args)
            return
        with self.lock:
            self._unflushed = True
            started = time.perf_counter()
            for sink in targets:
                self.guard(f"{what} to {sink.name}", getattr(sink, method), *args)
            self.write_s += time.perf_counter() - started

    def deliver(self, items: Sequence[tuple[str, tuple]], beside_training: bool) -> None:
        """Write what the recording worker made of a recording (see
        :class:`~lightning_rnnviz.pipeline.worker.Delivery`): ``beside_training``, from the worker, to the sinks
        written wholly beside training (and to the records keeper); else, on the training thread, each kind
        of write to the sinks that do not take it beside training.
        """
        # each kind of write goes one way: beside training under the lock (the sinks written wholly there),
        # beside training without it (`deliver_unlocked`), or on the training thread
        takers = {kind: [sink for sink in self.sinks
                         if (sink.writes_beside(kind) and sink.beside_training if beside_training
                             else not sink.writes_beside(kind))]
                  for kind, _ in items}
        keeper = self.keeper if beside_training else None
        if not any(takers.values()) and keeper is None:
            return
        with self.lock:
            if keeper is not None:
                self._keep_staged()
            for kind, args in items:
                self._write(kind, args, takers[kind], keeper)
            if beside_training:
                self._each("flush", "flush", sinks=[sink for sink in self.sinks if sink.beside_training])

    def deliver_unlocked(self, items: Sequence[tuple[str, tuple]]) -> None:
        """From the worker, without :attr:`lock`: the kinds of writes a sink takes beside training although
        its others are the training thread's (``writes_beside`` without ``beside_training``: MLflow's
        pictures, texts and documents, which touch nothing its scalars use), so the training thread never
        waits for them."""
        for kind, args in items:
            sinks = [sink for sink in self.sinks if not sink.beside_training and sink.writes_beside(kind)]
            if sinks:
                self._write(kind, args, sinks, None, locked=False)

    def _write(self, kind: str, args: tuple, sinks: Sequence[Sink], keeper: RecordKeeper | None,
               locked: bool = True) -> None:
        """One item of a delivery to ``sinks`` (and ``keeper``); ``locked``: under :attr:`lock`, held by the
        caller, where the fan-out's own bookkeeping is done too."""
        if kind == "picture":
            job, picture = args
            if locked:
                self.written.add((job.tag, job.step))
            if keeper is not None:
                self.guard("keep the records", keeper.job, job)
            self._each(f"write {job.tag!r}", "image", job.tag, picture, job.step, sinks=sinks, locked=locked)
        elif kind == "scalars":
            values, step = args
            self._each("write scalars", "scalars", values, step, sinks=sinks, locked=locked)
            if keeper is not None:
                self.guard("keep the records", keeper.scalars, values, step)
        elif kind == "histogram":
            tag, counted, step = args
            keeping = [sink for sink in sinks if sink.wants_histograms]
            histogram = Histogram.from_buckets(counted) if keeping else None
            if histogram is not None:
                self._each(f"write {tag!r}", "histogram", tag, histogram, step, sinks=keeping, locked=locked)
        elif kind in ("text", "document", "probe_set"):
            tag, body, step = args
            if locked:
                self.written.add((tag, step))
            rest = (body,) if kind == "document" else (body, step)
            self._each(f"write {tag!r}", kind, tag, *rest, sinks=sinks, locked=locked)

    def picture(self, job: Job) -> None:
        """Have ``job`` drawn, unless its tag was drawn for this step already."""
        with self.lock:
            if not self._first(job.tag, job.step):
                return
            if self.keeper is not None:
                self._keep(self.keeper.job, job)
        self.renderer.submit(job)
        if self.renderer.has_results:
            self.drain()

    def wait(self) -> None:
        """Have every picture submitted so far back from the renderer (an inline renderer's encoding
        helper) and write it; a renderer that draws in the background is not waited for."""
        self.renderer.wait()
        self.drain()

    def drain(self) -> None:
        """Write every picture the renderer has drawn so far."""
        for tag, step, picture in self.renderer.take():
            self._each(f"write {tag!r}", "image", tag, picture, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if values:
            with self.lock:
                self._each("write scalars", "scalars", values, step)
                if self.keeper is not None:
                    self._keep(self.keeper.scalars, values, step)

    def histogram(self, tag: str, buckets: Callable[[], Mapping[str, Any] | None], step: int) -> None:
        """Write ``buckets()`` everywhere (the fields of :class:`Histogram`, counted where the record lives,
        or ``None``), called once and only if some sink keeps histograms."""
        takers = [sink for sink in self.sinks if sink.wants_histograms]
        if not takers:
            return
        histogram = Histogram.from_buckets(buckets())
        if histogram is None:
            return  # nothing finite to show
        self._each(f"write {tag!r}", "histogram", tag, histogram, step, sinks=takers)

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Write a text everywhere, once per ``(tag, step)`` (the first monitor's, as for pictures)."""
        with self.lock:
            if self._first(tag, step):
                self._each(f"write {tag!r}", "text", tag, markdown, step)

    def document(self, name: str, data: Mapping[str, Any] | str, step: int) -> None:
        """Store a JSON document with the run (each sink where it can), once per ``(name, step)``."""
        with self.lock:
            if self._first(name, step):
                self._each(f"write {name!r}", "document", name, data)

    def probe_set(self, tag: str, blob: bytes, step: int) -> None:
        """Write a probe set (the explorer's data, a blob of :mod:`lightning_rnnviz.payload`'s format) where a
        sink keeps it, once per ``(tag, step)`` (the first monitor's)."""
        with self.lock:
            if self._first(tag, step):
                self._each(f"write {tag!r}", "probe_set", tag, blob, step)

    def _first(self, key: str, step: int) -> bool:
        with self.lock:
            if (key, step) in self.written:
                return False
            self.written.add((key, step))
            return True

    def _keep(self, work: Callable[..., None], *args: Any) -> None:
        """Under the lock: ``work(*args)``, a records keeper's method, now, or at the worker's next delivery
        (:attr:`records_beside`)."""
        if self.records_beside:
            self._staged.append((work, args))
        else:
            self.guard("keep the records", work, *args)

    def _keep_staged(self) -> None:
        """Under the lock: give the records keeper, in order, what the training thread left for the worker."""
        staged, self._staged = self._staged, []
        for work, args in staged:
            self.guard("keep the records", work, *args)

    def layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
        self._each("write the chart layout", "layout", charts)

    def flush(self, only_if_written: bool = False, only_if_free: bool = False) -> bool:
        """Write what the renderer has drawn and flush every sink (the user's logger's writer too, where a
        sink shares it) and the records keeper (unless the worker writes its files). ``only_if_written``:
        not when nothing was written since the last flush (an epoch without a recording: a TensorBoard
        writer's flush waits for its queue, a few ms). ``only_if_free``: not while the recording worker is
        writing (the training thread does not wait for it). Whether it flushed."""
        self.wait()
        if not self.lock.acquire(blocking=not only_if_free):
            return False
        try:
            if only_if_written and not self._unflushed:
                return True
            self._each("flush", "flush")
            self._unflushed = False
            if self.keeper is not None and not self.records_beside:
                self.guard("keep the records", self.keeper.flush)
            return True
        finally:
            self.lock.release()

    def close(self, timeout: float = 60.0) -> None:
        """Let the renderer finish, write what it drew, then flush and close every sink."""
        self.guard("stop the drawing process", self.renderer.close, timeout)
        self.flush()
        if self.keeper is not None:
            with self.lock:
                self._keep_staged()
            self.guard("keep the records", self.keeper.close)
        self._each("close", "close")
