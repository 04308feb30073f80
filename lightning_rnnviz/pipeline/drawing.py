"""Where pictures are drawn: on the training thread or in a low-priority child process (the recording
worker of :mod:`lightning_rnnviz.pipeline.worker` draws its own).

Either way a :class:`~lightning_rnnviz.render.jobs.Job` (a small, already-reduced payload) becomes a PNG-encoded
:class:`~lightning_rnnviz.sinks.base.Picture`, which the caller takes back with ``take()`` and writes to every
logger itself: drawing happens once per picture, however many loggers there are, and only the training
process writes, so each run directory has one writer.

The child is a plain ``python -m`` process fed through a pipe — not a ``multiprocessing`` child, which would
re-import the user's training script — and it runs at a lower CPU priority, so on a busy machine it mostly
draws in the gaps the training leaves. Pending work is bounded: when the child falls behind, the oldest job
is dropped and counted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from lightning_rnnviz.render.jobs import Job, draw
from lightning_rnnviz.sinks.base import Picture

_HEADER = struct.Struct("<Q")

Drawn = tuple[str, int, Picture]  # (tag, step, picture)


class InlineRenderer:
    """Draws on the calling thread. The PNG encoding (zlib, which releases the GIL) goes to a helper thread,
    where it runs while the caller draws the next picture and reduces the next record; :meth:`wait` has
    every picture back, and the callback waits before it returns to training, so the helper never runs
    beside the user's steps. ``render_s`` adds up the drawing, ``encode_s`` what the caller spent encoding
    or waiting for the helper.

    Args:
        encode_aside: encode on the helper thread; ``None``: where this process may use two CPUs or more.
    """

    dropped = 0
    peak_rss_mb = None

    def __init__(self, encode_aside: bool | None = None) -> None:
        self.render_s = 0.0
        self.encode_s = 0.0
        self.encode_aside = usable_cpus() >= 2 if encode_aside is None else bool(encode_aside)
        self._ready: list[Drawn] = []
        self._pending: collections.deque[tuple[str, int, concurrent.futures.Future]] = collections.deque()
        self._errors: list[str] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, job: Job) -> None:
        started = time.perf_counter()
        rgb = draw(job)
        drawn = time.perf_counter()
        self.render_s += drawn - started
        if not self.encode_aside:
            picture = Picture.from_rgb(rgb)
            self.encode_s += time.perf_counter() - drawn
            self._ready.append((job.tag, job.step, picture))
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rnnviz-encode")
        self._pending.append((job.tag, job.step, self._pool.submit(Picture.from_rgb, rgb)))

    def _collect(self, block: bool) -> None:
        """Move encoded pictures, in the order submitted, from the helper to ``take()``; ``block``: all."""
        started = time.perf_counter()
        while self._pending and (block or self._pending[0][2].done()):
            tag, step, future = self._pending.popleft()
            try:
                self._ready.append((tag, step, future.result()))
            except Exception as error:  # noqa: BLE001 - reported to the caller, which warns once
                self._errors.append(f"encode {tag}: {type(error).__name__}: {error}".replace("\n", " "))
        self.encode_s += time.perf_counter() - started

    def wait(self) -> None:
        """Return once every picture submitted so far is encoded (at once without the helper)."""
        self._collect(block=True)

    @property
    def has_results(self) -> bool:
        self._collect(block=False)
        return bool(self._ready)

    def take(self) -> list[Drawn]:
        """The pictures drawn and encoded since the last call."""
        self._collect(block=False)
        ready, self._ready = self._ready, []
        return ready

    def errors(self) -> list[str]:
        """Encoding errors since the last call (a drawing error is raised by :meth:`submit` itself)."""
        errors, self._errors = self._errors, []
        return errors

    def close(self, timeout: float = 0.0) -> None:
        """Encode what is pending, then stop the helper thread."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Returned:
    """What a renderer drawing off the caller's thread has handed back: pictures and error lines."""

    def __init__(self) -> None:
        self._ready: collections.deque[Drawn] = collections.deque()
        self._errors: collections.deque[str] = collections.deque()

    @property
    def has_results(self) -> bool:
        return bool(self._ready)

    def take(self) -> list[Drawn]:
        """The pictures that came back since the last call."""
        return _drain(self._ready)

    def errors(self) -> list[str]:
        """Errors reported since the last call."""
        return _drain(self._errors)

    def wait(self) -> None:
        """Nothing to wait for: this renderer draws beside training on purpose, and its pictures are taken
        as they come back."""


def _drain(queue: collections.deque) -> list:
    items = []
    while queue:
        items.append(queue.popleft())
    return items


def spare_cores(accelerator: bool = False, loader_workers: int = 0) -> int:
    """CPUs this process may use beyond what the training occupies.

    On an accelerator the training occupies its own thread (torch's intra-op pool is sized to the host
    but sleeps while the device computes); on the CPU, its intra-op threads. The data loader's worker
    processes, where known, take one each.
    """
    available = usable_cpus()
    try:
        import torch

        busy = 1 if accelerator else torch.get_num_threads()
    except ImportError:  # pragma: no cover - the training process has torch
        busy = available
    return available - busy - loader_workers


def _start_child() -> subprocess.Popen:
    """A drawing process (:func:`serve`), fed and read through pipes."""
    env = dict(os.environ)
    # The child must find this package however the parent found it (editable install, sys.path).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_rnnviz.pipeline.drawing"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def _reap(process: subprocess.Popen, timeout: float) -> None:
    """Wait for a drawing process to exit, at most ``timeout`` seconds, then kill it."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _close_pipes(process: subprocess.Popen) -> None:
    for stream in (process.stdin, process.stdout):
        with contextlib.suppress(OSError):
            stream.close()


class NotReady(Exception):
    """The drawing process is still starting (importing what it draws with): draw this picture elsewhere."""


class DrawingProcess:
    """A drawing process for a caller that waits for each picture: the recording worker.

    Painting is many small numpy calls in Python, which hold the GIL between them: drawn on a worker
    thread, the pictures slowed the user's training thread by a quarter while they were drawn (fast-step
    here, one intra-op thread: 31 -> 41 ms a step; 33.7 ms with the worker's replay and reductions alone,
    32.7 ms with all of it in another process). In a process of its own the drawing holds no GIL of the
    training's; the worker blocks on the pipe, which releases it. One job at a time: the reply is read
    before the next job is sent, so neither side's pipe can fill while the other waits.

    The child takes a second or so to start (an interpreter, numpy, Pillow, the painter); until it says it
    is ready, :meth:`draw` raises :class:`NotReady` at once, for the caller to draw that picture itself
    rather than wait. It raises :class:`RuntimeError` with the child's message when a job fails, and
    :class:`BrokenPipeError` once the child is gone (``alive`` then says so), for the caller to draw on
    its own thread from then on.
    """

    def __init__(self) -> None:
        self._process = _start_child()
        self._lock = threading.Lock()
        self._ready = False
        self.peak_rss_mb: float | None = None  # the child's, reported when it exits

    @property
    def ready(self) -> bool:
        """Whether the child has started (never waits)."""
        if not self._ready:
            stdout = self._process.stdout
            if select.select([stdout], [], [], 0)[0]:  # its first message, or the end of its output
                message = _receive(stdout)
                if message is None:
                    raise BrokenPipeError("the drawing process stopped before it was ready")
                self._ready = message[0] == "ready"
        return self._ready

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def draw(self, job: Job) -> Picture:
        """``job`` drawn and PNG-encoded by the child."""
        blob = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if not self.ready:
                raise NotReady
            try:
                self._process.stdin.write(_HEADER.pack(len(blob)) + blob)
                self._process.stdin.flush()
            except (OSError, ValueError) as error:
                raise BrokenPipeError(f"the drawing process is gone: {error}") from None
            message = _receive(self._process.stdout)
        if message is None:
            raise BrokenPipeError("the drawing process is gone")
        kind, body = message
        if kind == "error":
            raise RuntimeError(f"drawing process: {body}")
        tag, step, png, width, height = body
        return Picture(png, width, height)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child (it has nothing pending: each job was waited for) and read its peak memory."""
        with self._lock:
            with contextlib.suppress(OSError, ValueError):
                self._process.stdin.write(_HEADER.pack(0))
                self._process.stdin.flush()
            while (message := _receive(self._process.stdout)) is not None:
                if message[0] == "peak_rss_kb":
                    self.peak_rss_mb = message[1] / 1024
            _reap(self._process, timeout)
            _close_pipes(self._process)


class BackgroundRenderer(_Returned):
    """Hands jobs to a drawing process and takes its pictures back; never blocks the caller.

    A thread moves job bytes into the pipe and another reads pictures back (both release the GIL while
    they wait on the pipe); :meth:`take` hands the caller what has arrived.

    Args:
        max_pending: jobs waiting to be sent; beyond it the oldest is dropped (and counted in ``dropped``).
    """

    render_s = encode_s = 0.0  # nothing is drawn or encoded on the caller's thread

    def __init__(self, max_pending: int = 64) -> None:
        super().__init__()
        self._process = _start_child()
        self._pending: collections.deque[bytes | None] = collections.deque()
        self._max_pending = max_pending
        self._wake = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.peak_rss_mb: float | None = None  # the child's, reported when it exits
        self._writer = threading.Thread(target=self._write_loop, name="rnnviz-render-feed", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="rnnviz-render-take", daemon=True)
        self._writer.start()
        self._reader.start()

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

    def _read_loop(self) -> None:
        stream = self._process.stdout
        while (message := _receive(stream)) is not None:
            kind, body = message
            if kind == "picture":
                tag, step, png, width, height = body
                self._ready.append((tag, step, Picture(png, width, height)))
            elif kind == "error":
                self._errors.append(body)
            elif kind == "peak_rss_kb":
                self.peak_rss_mb = body / 1024

    def close(self, timeout: float = 60.0) -> None:
        """Let the child finish what was handed over (at most ``timeout`` seconds), then stop it; the
        pictures it drew are still there for :meth:`take`."""
        if self._closed:
            return
        self._closed = True
        self._send(None)
        self._writer.join(timeout)
        _reap(self._process, timeout)
        self._reader.join(timeout)
        _close_pipes(self._process)

    @property
    def alive(self) -> bool:
        return self._process.poll() is None


def _read_exact(stream: Any, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = stream.read(size - len(data))
        except (OSError, ValueError):
            return None
        if not chunk:
            return None
        data += chunk
    return data


def _receive(stream: Any) -> Any:
    """One framed pickle from ``stream``; ``None`` at an empty message or the end of the stream."""
    header = _read_exact(stream, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size == 0:
        return None
    blob = _read_exact(stream, size)
    return None if blob is None else pickle.loads(blob)  # noqa: S301 - our own child / parent, over a pipe


def _reply(stream: Any, kind: str, body: Any) -> None:
    blob = pickle.dumps((kind, body), protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(blob)) + blob)
    stream.flush()


def serve(stdin: Any = None, stdout: Any = None, announce: bool = False) -> None:
    """The drawing process: read jobs until an empty message or end of input, draw and encode each, and
    send the picture (or the error) back. ``announce``: first load the painter and say ``("ready", None)``."""
    from lightning_rnnviz.sinks.png import encode_png

    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    with contextlib.suppress(OSError, AttributeError):
        # Below the training process, yet not starved: at nice 10 the child gets about a tenth of a
        # core the training wants, which keeps up with the default cadence.
        os.nice(10)
    if announce:
        import lightning_rnnviz.render.paint  # noqa: F401 - what the first picture would load

        _reply(stdout, "ready", None)
    try:
        while (job := _receive(stdin)) is not None:
            try:
                rgb = draw(job)
                reply = ("picture", (job.tag, job.step, encode_png(rgb), int(rgb.shape[1]), int(rgb.shape[0])))
            except Exception as error:  # noqa: BLE001 - reported to the parent, which warns once
                reply = ("error", f"{job.kind} {job.tag}: {type(error).__name__}: {error}".replace("\n", " "))
            _reply(stdout, *reply)
    finally:
        peak = _peak_rss_kb()
        with contextlib.suppress(OSError, ValueError):
            if peak is not None:
                _reply(stdout, "peak_rss_kb", peak)
            stdout.write(_HEADER.pack(0))
            stdout.flush()


def _peak_rss_kb() -> int | None:
    """This process's own peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's at fork time)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


if __name__ == "__main__":
    serve(announce=True)
    os._exit(0)  # all was written and flushed: no interpreter teardown for the parent to wait for
