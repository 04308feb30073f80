"""Drawing off the training process: a low-priority child process draws payloads and writes the images.

The training thread only reduces a record to a small payload (one sample, selected units, binned time)
and hands it over; it never waits for matplotlib or for disk. The child is a plain ``python -m`` process
fed through a pipe — not a ``multiprocessing`` child, which would re-import the user's training script —
and it runs at a lower CPU priority, so on a busy machine it mostly draws in the gaps the training leaves.
Pending work is bounded: when the child falls behind, the oldest job is dropped and counted.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_rnnviz.sinks.base import Sink

_HEADER = struct.Struct("<Q")


@dataclass
class Job:
    """One figure to draw: which kind, its payload (from a ``render.reduce_*``), where and when, and with
    which renderer (``"fast"``: :mod:`lightning_rnnviz.render.paint`; ``"matplotlib"``: the ``draw_*``
    figures)."""

    kind: str
    payload: Mapping[str, Any]
    tag: str
    step: int
    renderer: str = "fast"


def draw(job: Job) -> np.ndarray:
    """Draw a job as an ``(H, W, 3)`` uint8 image."""
    p = job.payload
    if job.renderer == "fast":
        from lightning_rnnviz.render import paint

        if job.kind == "grad_decay":
            return paint.paint_grad_decay(p["history"], p["name"], p["layer_labels"], step=job.step)
        return paint.PAINTERS[job.kind](p, step=job.step)
    if job.renderer != "matplotlib":
        raise ValueError(f"unknown renderer {job.renderer!r}; use 'fast' or 'matplotlib'")
    from lightning_rnnviz import render

    drawers = {
        "hidden": render.draw_hidden,
        "gates": render.draw_gates,
        "grad_norm": render.draw_grad_norm,
        "attention": render.draw_attention,
    }
    if job.kind == "grad_decay":
        figure = render.draw_grad_decay(p["history"], p["name"], p["layer_labels"], step=job.step)
    else:
        figure = drawers[job.kind](p, step=job.step)
    return render.figure_to_rgb(figure)


class InlineRenderer:
    """Draws and writes on the calling thread; ``render_s`` and ``write_s`` add up what that cost."""

    dropped = 0

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.render_s = 0.0
        self.write_s = 0.0

    def submit(self, job: Job) -> None:
        started = time.perf_counter()
        image = draw(job)
        drawn = time.perf_counter()
        self.sink.image(job.tag, image, job.step)
        self.render_s += drawn - started
        self.write_s += time.perf_counter() - drawn

    def errors(self) -> list[str]:
        return []

    def flush(self) -> None:
        self.sink.flush()

    def close(self, timeout: float = 0.0) -> None:
        self.sink.flush()


def make_sink(spec: tuple[str, str]) -> Sink:
    """The image sink a drawing process writes to: ``("tensorboard", log_dir)`` or ``("files", root)``."""
    kind, where = spec
    if kind == "tensorboard":
        from lightning_rnnviz.sinks.events import EventImageSink

        return EventImageSink(where)
    from lightning_rnnviz.sinks.files import FileSink

    return FileSink(where)


class BackgroundRenderer:
    """Hands jobs to a drawing process; never blocks the caller.

    Args:
        sink_spec: where the child writes images, see :func:`make_sink`.
        max_pending: jobs waiting to be sent; beyond it the oldest is dropped (and counted in
            ``dropped``).
    """

    def __init__(self, sink_spec: tuple[str, str], max_pending: int = 64) -> None:
        env = dict(os.environ)
        # The child must find this package however the parent found it (editable install, sys.path).
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "lightning_rnnviz.sinks.background"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        os.set_blocking(self._process.stdout.fileno(), False)
        self._pending: collections.deque[bytes | None] = collections.deque()
        self._max_pending = max_pending
        self._wake = threading.Condition()
        self._closed = False
        self._buffer = b""
        self._report_tail: list[str] = []
        self.dropped = 0
        self.peak_rss_mb: float | None = None  # the child's, reported when it exits
        self._send(pickle.dumps(sink_spec, protocol=pickle.HIGHEST_PROTOCOL))
        # A thread only moves bytes into the pipe; a blocked write releases the GIL.
        self._writer = threading.Thread(target=self._write_loop, name="rnnviz-render-feed", daemon=True)
        self._writer.start()

    def _send(self, blob: bytes | None) -> None:
        with self._wake:
            if blob is not None and len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(blob)
            self._wake.notify()

    def submit(self, job: Job) -> None:
        if not self._closed:
            self._send(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))

    def _write_loop(self) -> None:
        stream = self._process.stdin
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                blob = self._pending.popleft()
            try:
                if blob is None:
                    stream.write(_HEADER.pack(0))
                    stream.flush()
                    return
                stream.write(_HEADER.pack(len(blob)))
                stream.write(blob)
                stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                return

    def errors(self) -> list[str]:
        """Error lines the child reported since the last call (read without blocking)."""
        if self._process.stdout.closed:
            tail, self._report_tail = self._report_tail, []
            return tail
        with contextlib.suppress(BlockingIOError, OSError, ValueError, TypeError):
            chunk = self._process.stdout.read()
            if chunk:
                self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        errors = []
        for line in lines:
            if line.startswith(b"#peak_rss_kb "):
                self.peak_rss_mb = int(line.split()[1]) / 1024
            elif line:
                errors.append(line.decode(errors="replace"))
        return errors

    def flush(self) -> None:
        """Nothing to do: the child flushes its writer whenever its queue runs empty."""

    def close(self, timeout: float = 60.0) -> None:
        """Let the child finish what was handed over (at most ``timeout`` seconds), then stop it."""
        if self._closed:
            return
        self._closed = True
        self._send(None)
        self._writer.join(timeout)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._report_tail = self.errors()  # read what the child said before closing its pipe
        for stream in (self._process.stdin, self._process.stdout):
            with contextlib.suppress(OSError):
                stream.close()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None


def _read_exact(stream: Any, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(stdin: Any = None, stdout: Any = None) -> None:
    """The drawing process: read jobs until an empty message or end of input, draw, write."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    with contextlib.suppress(OSError, AttributeError):
        # Below the training process, yet not starved: at nice 10 the child gets about a tenth of a
        # core the training wants, which keeps up with the default cadence.
        os.nice(10)

    def receive() -> Any:
        header = _read_exact(stdin, _HEADER.size)
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        if size == 0:
            return None
        blob = _read_exact(stdin, size)
        return None if blob is None else pickle.loads(blob)

    sink = make_sink(receive())
    try:
        while (job := receive()) is not None:
            try:
                sink.image(job.tag, draw(job), job.step)
            except Exception as error:  # noqa: BLE001 - reported to the parent, which warns once
                message = f"{job.kind} {job.tag}: {type(error).__name__}: {error}".replace("\n", " ")
                stdout.write(message.encode() + b"\n")
                stdout.flush()
            sink.flush()
    finally:
        sink.close()
        peak = _peak_rss_kb()
        if peak is not None:
            stdout.write(f"#peak_rss_kb {peak}\n".encode())
            stdout.flush()


def _peak_rss_kb() -> int | None:
    """This process's own peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's at fork time)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


if __name__ == "__main__":
    serve()
