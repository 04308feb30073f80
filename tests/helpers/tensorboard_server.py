"""A real TensorBoard for tests: a subprocess on loopback, read through its HTTP API, always stopped.

Tests that say "the user sees it in TensorBoard" start ``python -m tensorboard.main`` on a log folder with
either of its two loaders and ask it what it serves, as its web page does:

* ``loader="rust"``: ``--load_fast=true``, the Rust data server (``tensorboard_data_server``) that is the
  default wherever it is installed. TensorBoard 2.21 exits when it cannot start it under ``true``, but under
  ``--load_fast=auto`` (its default) it falls back to the Python loader without a word on stderr, so the
  server is checked after start-up: ``/data/environment`` must name ``GrpcDataProvider`` and a data-server
  child process must be alive; anything else fails the start (a "Rust" test served by Python proves
  nothing).
* ``loader="python"``: ``--load_fast=false``, the multiplexer that reads event files in TensorBoard's own
  process (``MultiplexerDataProvider``).

How the endpoints behave in TensorBoard 2.21 (tensorboard-data-server 0.7.2), found by asking both loaders
the same questions about event files written by ``torch.utils.tensorboard.SummaryWriter``:

===============================================  ==========================================================
endpoint                                         behaviour; differences between the loaders
===============================================  ==========================================================
``/data/runs``                                   JSON list of run names (sub-folders relative to the log
                                                 folder, ``/``-separated: ``run_a`` and ``run_a/sub`` are two
                                                 runs), ordered by first event time; the same for both.
``/data/plugins_listing``                        ``{plugin: {enabled, tab_name, loading_mechanism, ...}}``;
                                                 the same for both. ``enabled`` says whether data exists.
``/data/environment``                            ``debug.data_provider`` is ``GrpcDataProvider(addr=...)``
                                                 (Rust) or ``MultiplexerDataProvider(logdir=...)`` (Python);
                                                 ``creation_time`` is ``0.0`` (Rust) or ``0`` (Python).
``/data/plugin/{scalars,histograms,``            ``{run: {tag: {displayName, description}}}``, runs without
``distributions}/tags``                          such tags left out. ``displayName`` of a summary that
                                                 names none (all of torch's): ``""`` from Rust, the tag from
                                                 Python. Key order: arbitrary (Rust), sorted (Python).
``/data/plugin/images/tags``                     as above plus ``samples`` (images per step).
``/data/plugin/text/tags``                       ``{run: [tag, ...]}`` (a list, not a dict); list order
                                                 differs. torch's ``add_text("notes", ...)`` makes the tag
                                                 ``notes/text_summary``.
``/data/plugin/scalars/scalars?run=&tag=``       ``[[wall_time, step, value], ...]``; unknown run or tag:
                                                 404 ``text/plain`` ``Not found: No scalar data for ...``
                                                 (both). ``&format=csv`` gives CSV.
``/data/plugin/images/images?run=&tag=&sample=``  ``[{wall_time, step, query}, ...]``; ``query`` is
                                                 ``blob_key=...``, an opaque URL-safe base64 JSON key whose
                                                 contents differ (Python's names the plugin, Rust's does
                                                 not). Widths and heights are not served here. ``sample``
                                                 beyond the images per step: ``[]``; unknown tag: 404;
                                                 missing ``run`` or ``tag``: 500 (both).
``/data/plugin/images/individualImage?<query>``  the PNG bytes, ``image/png`` (both). A malformed key: 400
                                                 ``text/plain`` (Rust), 500 HTML (Python).
``/data/plugin/histograms/histograms?run=&tag=``  ``[[wall_time, step, [[left, right, count], ...]], ...]``.
                                                 Same totals; Rust keeps torch's empty leading bucket (so
                                                 one bucket more, whose ``left`` is the minimum and exceeds
                                                 its ``right``) and float64 edges, Python drops it and
                                                 serves float32 edges. Unknown tag: 404 (both).
``/data/plugin/text/text?run=&tag=``             ``[{wall_time, step, text}, ...]``, ``text`` is HTML (the
                                                 markdown rendered, wrapped in a ``<table>``;
                                                 ``&markdown=false`` escapes it instead). Unknown tag: 200
                                                 ``[]`` (both), not 404.
``/data/plugin/custom_scalars/layout``           the merged ``Layout`` proto as JSON
                                                 (``{"category": [{"title", "chart": [{"title",
                                                 "multiline": {"tag": [regex, ...]}}]}]}``), ``{}`` when no
                                                 run holds one; the same for both.
``/data/plugin/custom_scalars/scalars?run=&tag=``  ``tag`` is a regex: ``{"regex_valid", "tag_to_events":
                                                 {tag: [[wall_time, step, value], ...]}}``; the same.
===============================================  ==========================================================

Two things that users see differently, pinned by ``tests/test_tensorboard_harness.py``:

* One tag written as an image and as a histogram in one run. Rust keeps the kind that came first and drops
  the other's values (image first: the histogram is invisible; histogram first: the images are). Python
  lists the tag under both plugins' data: image first, the histogram's steps become entries of the image
  series whose ``individualImage`` breaks the connection (the server fails with "applications must write
  bytes") and ``samples`` is nonsense; the histogram is not served.
* Several event files in one run folder. Rust reads all of them on every reload. Python's directory
  watcher reads them in name order and, once it has moved to a later file, never reads an earlier one
  again: records appended later to any file but the last by name are not shown until TensorBoard restarts
  (``--reload_multifile=true`` changes that). A fresh start reads every file once, so this only shows live.

Example::

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as logdir, TensorBoardServer(logdir, loader="rust") as board:
    ...     board.data_provider, board.runs(), board.tags("images")
    ('rust', [], {})
"""

from __future__ import annotations

import contextlib
import dataclasses
import html.parser
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

T = TypeVar("T")
Loader = Literal["rust", "python"]
LOADERS: tuple[Loader, ...] = ("rust", "python")
DEFAULT_SAMPLES = "images=1000,histograms=1000,scalars=10000,text=1000"
PLUGINS = ("scalars", "images", "histograms", "distributions", "text", "custom_scalars")
_LOAD_FAST = {"rust": "true", "python": "false"}
_PROVIDER = {"rust": "GrpcDataProvider", "python": "MultiplexerDataProvider"}
# Never through a proxy: every request goes to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TensorBoardStartupError(RuntimeError):
    """TensorBoard did not come up as asked (exited, never answered, or serves with the other loader)."""


class TensorBoardHTTPError(RuntimeError):
    """An endpoint answered with a status other than 200."""

    def __init__(self, status: int, url: str, content_type: str, body: bytes) -> None:
        self.status, self.url, self.content_type, self.body = status, url, content_type, body
        text = body[:300].decode("utf-8", "replace").strip()
        super().__init__(f"HTTP {status} ({content_type}) from {url}: {text}")


#: What `wait_until` treats as "not there yet": HTTP errors (404 before a tag loads), refused or reset
#: connections, and a response cut short.
NOT_YET: tuple[type[BaseException], ...] = (TensorBoardHTTPError, OSError, http.client.HTTPException)


@dataclass(frozen=True)
class TagInfo:
    """One tag of one run, as a plugin's ``tags`` route lists it."""

    display_name: str  # as served: "" from Rust for a summary that names none, the tag from Python
    description: str = ""
    samples: int | None = None  # images per step (images only)
    matches: tuple[str, ...] = ()  # custom_scalars: the scalar tags the chart's regexes match


@dataclass(frozen=True)
class ScalarPoint:
    step: int
    wall_time: float
    value: float


@dataclass(frozen=True)
class ImageEntry:
    """One image of a series; ``width`` and ``height`` come from decoding it (the API does not serve them)."""

    run: str
    tag: str
    step: int
    wall_time: float
    url: str  # full URL of its ``individualImage``
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Picture:
    """Bytes served by ``individualImage``, decoded by Pillow."""

    data: bytes
    width: int
    height: int
    format: str  # Pillow's name, "PNG" for everything TensorBoard's image summaries hold

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def pixels(self) -> np.ndarray:
        """The decoded image ``(height, width[, channels])``, uint8."""
        from PIL import Image

        with Image.open(io.BytesIO(self.data)) as image:
            return np.asarray(image)


@dataclass(frozen=True)
class HistogramPoint:
    step: int
    wall_time: float
    buckets: tuple[tuple[float, float, float], ...]  # (left, right, count)

    @property
    def total(self) -> float:
        return float(sum(count for _, _, count in self.buckets))


@dataclass(frozen=True)
class TextPoint:
    step: int
    wall_time: float
    html: str

    @property
    def plain(self) -> str:
        """The text without markup, whitespace collapsed."""
        return _strip_html(self.html)


@dataclass
class TensorBoardServer:
    """``python -m tensorboard.main`` on ``logdir`` at ``127.0.0.1:<free port>``, and helpers over its API.

    Args:
        logdir: the folder TensorBoard watches (it may be empty; runs appear as they are written).
        loader: ``"rust"`` (``--load_fast=true``) or ``"python"`` (``--load_fast=false``); checked after
            start-up.
        samples_per_plugin: passed as ``--samples_per_plugin`` (TensorBoard keeps 10 images by default).
        reload_interval: seconds between TensorBoard's reads of the log folder.
        extra_flags: more command-line flags, placed last so that they override the ones above (``--host``
            and ``--bind_all`` are refused: the server stays on loopback).
        env: extra environment variables for TensorBoard.
        startup_timeout: seconds to wait for the first HTTP answer.
        request_timeout: seconds for any one HTTP request.
        log_dir: where TensorBoard's stdout and stderr go (``tensorboard.log``); a temporary folder, removed
            at `stop`, when ``None``.

    Raises:
        TensorBoardStartupError: from `start`, with the end of TensorBoard's log.
    """

    logdir: str | os.PathLike[str]
    loader: Loader = "rust"
    samples_per_plugin: str = DEFAULT_SAMPLES
    reload_interval: float = 1.0
    extra_flags: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    startup_timeout: float = 60.0
    request_timeout: float = 10.0
    log_dir: str | os.PathLike[str] | None = None
    port: int | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: Any = field(default=None, init=False, repr=False)
    _own_log_dir: str | None = field(default=None, init=False, repr=False)
    _data_provider: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"`loader` must be one of {LOADERS}, got {self.loader!r}")
        for flag in self.extra_flags:
            if flag.split("=")[0] in ("--host", "--bind_all"):
                raise ValueError(f"`extra_flags` may not contain {flag!r}: the server stays on 127.0.0.1")

    # ----------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> TensorBoardServer:  # noqa: PYI034 - Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("`TensorBoardServer` is not started: call `start()` or use it in `with`")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path:
        return Path(self.log_dir or self._own_log_dir or ".") / "tensorboard.log"

    @property
    def data_provider(self) -> Loader:
        """The loader that really serves, as checked at start-up."""
        if self._data_provider is None:
            raise RuntimeError("`TensorBoardServer` is not started")
        return self._data_provider  # type: ignore[return-value]

    def command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "tensorboard.main",
            "--logdir", os.fspath(self.logdir),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--reload_interval", f"{self.reload_interval:g}",
            f"--load_fast={_LOAD_FAST[self.loader]}",
            "--samples_per_plugin", self.samples_per_plugin,
            *self.extra_flags,
        ]

    def start(self) -> TensorBoardServer:
        """Start TensorBoard, wait until it answers and check its loader; on failure it is stopped again."""
        if self._proc is not None:
            return self
        if self.log_dir is None:
            self._own_log_dir = tempfile.mkdtemp(prefix="tensorboard-harness-")
        else:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        try:
            for attempt in range(3):  # a free port can be taken between our probe and TensorBoard's bind
                self._spawn(free_port())
                if self._wait_for_http():
                    break
                self._terminate()
                if attempt == 2:
                    raise TensorBoardStartupError(f"no free port after 3 tries\n{self.log_tail()}")
            self._data_provider = self._check_loader()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self

    def _spawn(self, port: int) -> None:
        self.port = port
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in `stop`
        env = {**os.environ, **(self.env or {})}
        self._proc = subprocess.Popen(
            self.command(port),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: the data server goes with it
        )

    def _wait_for_http(self) -> bool:
        """True once ``/data/environment`` answers; False when the port was taken; raises otherwise."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "could not bind to port" in self.log_tail():
                    return False
                raise TensorBoardStartupError(
                    f"TensorBoard ({self.loader} loader) exited with {self._proc.returncode} before it "
                    f"answered on {self.url}; its log ends:\n{self.log_tail()}"
                )
            try:
                self.get_json("/data/environment", timeout=2.0)
                return True
            except NOT_YET:
                time.sleep(0.1)
        raise TensorBoardStartupError(
            f"TensorBoard ({self.loader} loader) did not answer on {self.url} within "
            f"{self.startup_timeout:g} s; its log ends:\n{self.log_tail()}"
        )

    def _check_loader(self) -> Loader:
        provider = str(self.environment().get("debug", {}).get("data_provider", ""))
        servers = self.data_server_pids()
        if provider.startswith(_PROVIDER["rust"]) and servers:
            found: Loader = "rust"
        elif provider.startswith(_PROVIDER["python"]) and not servers:
            found = "python"
        else:
            found = None  # type: ignore[assignment]
        if found != self.loader:
            raise TensorBoardStartupError(
                f"asked for the {self.loader} loader (--load_fast={_LOAD_FAST[self.loader]}, flags "
                f"{list(self.extra_flags)}) but TensorBoard serves from "
                f"{provider or 'an unnamed provider'!r} with data-server processes {servers}: a test on "
                f"this server would not test the {self.loader} loader. Is `tensorboard-data-server` "
                f"installed and runnable? Log ends:\n"
                f"{self.log_tail()}"
            )
        return found

    def data_server_pids(self) -> list[int]:
        """Live children of TensorBoard that look like the Rust data server (``--port-file=`` in argv)."""
        if self._proc is None:
            return []
        return [
            p.pid for p in processes()
            if p.ppid == self._proc.pid and any(a.startswith("--port-file=") for a in p.argv)
        ]

    def stop(self) -> None:
        """Stop TensorBoard and its data server (SIGTERM, then SIGKILL); raise if any process is left."""
        left: list[Process] = []
        try:
            left = self._terminate()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._own_log_dir is not None:
                shutil.rmtree(self._own_log_dir, ignore_errors=True)
                self._own_log_dir = None
        if left:
            raise RuntimeError(f"TensorBoard left processes behind: {left}")

    def _terminate(self) -> list[Process]:
        proc, self._proc = self._proc, None
        if proc is None:
            return []
        pgid = proc.pid  # the group leader, by `start_new_session`
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        # The data server exits when its stdin (TensorBoard) closes; give it a moment, then make sure.
        left = _wait_group_gone(pgid, 5.0)
        if left:
            _signal_group(pgid, signal.SIGKILL)
            left = _wait_group_gone(pgid, 5.0)
        return left

    def log_tail(self, lines: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------------------------------- HTTP
    def full_url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"{self.url}{path}{query}"

    def get(self, path: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None
            ) -> tuple[bytes, str]:
        """GET ``path`` (with ``params`` URL-encoded); returns the body and its Content-Type.

        Raises:
            TensorBoardHTTPError: for a status other than 200.
        """
        url = path if path.startswith("http") else self.full_url(path, params)
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"refusing to fetch {url!r}: only this server on 127.0.0.1 is asked")
        try:
            with _OPENER.open(url, timeout=timeout or self.request_timeout) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            body = error.read()
            error.close()
            raise TensorBoardHTTPError(error.code, url, error.headers.get("Content-Type", ""), body) from None

    def get_json(self, path: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None
                 ) -> Any:
        body, _ = self.get(path, params, timeout=timeout)
        return json.loads(body)

    def environment(self) -> dict[str, Any]:
        return self.get_json("/data/environment")

    def plugins_listing(self) -> dict[str, dict[str, Any]]:
        return self.get_json("/data/plugins_listing")

    def runs(self) -> list[str]:
        """Run names, sorted."""
        return sorted(self.get_json("/data/runs"))

    def tags(self, plugin: str) -> dict[str, dict[str, TagInfo]]:
        """``{run: {tag: TagInfo}}`` for one plugin, the same shape for every plugin and loader.

        Runs without tags are left out. ``custom_scalars`` maps each run to the scalar tags that the
        layout's charts plot there (``display_name`` is the chart's title, ``matches`` all its tags).
        """
        if plugin not in PLUGINS:
            raise ValueError(f"`plugin` must be one of {PLUGINS}, got {plugin!r}")
        if plugin == "custom_scalars":
            return self._custom_scalar_tags()
        raw = self.get_json(f"/data/plugin/{plugin}/tags")
        out: dict[str, dict[str, TagInfo]] = {}
        for run, tags in raw.items():
            if isinstance(tags, list):  # text lists names only
                infos = {tag: TagInfo(display_name="") for tag in tags}
            else:
                infos = {
                    tag: TagInfo(info.get("displayName", ""), info.get("description", ""),
                                 info.get("samples"))
                    for tag, info in tags.items()
                }
            if infos:
                out[run] = dict(sorted(infos.items()))
        return dict(sorted(out.items()))

    def _custom_scalar_tags(self) -> dict[str, dict[str, TagInfo]]:
        charts = [(chart.get("title", ""), _chart_patterns(chart))
                  for category in self.custom_scalars_layout().get("category", [])
                  for chart in category.get("chart", [])]
        out: dict[str, dict[str, TagInfo]] = {}
        for run in self.runs():
            for title, patterns in charts:
                matched = sorted({tag for pattern in patterns for tag in self.custom_scalars(run, pattern)})
                for tag in matched:
                    out.setdefault(run, {})[tag] = TagInfo(display_name=title, matches=tuple(matched))
        return {run: dict(sorted(tags.items())) for run, tags in sorted(out.items())}

    def scalars(self, run: str, tag: str) -> list[ScalarPoint]:
        rows = self.get_json("/data/plugin/scalars/scalars", {"run": run, "tag": tag})
        return [ScalarPoint(step=int(s), wall_time=float(w), value=float(v)) for w, s, v in rows]

    def images(self, run: str, tag: str, *, sample: int = 0, sizes: bool = True) -> list[ImageEntry]:
        """The image series of ``run``/``tag``; with ``sizes``, every image is fetched to learn its size."""
        rows = self.get_json("/data/plugin/images/images", {"run": run, "tag": tag, "sample": sample})
        entries = [
            ImageEntry(run, tag, int(row["step"]), float(row["wall_time"]),
                       f"{self.url}/data/plugin/images/individualImage?{row['query']}")
            for row in rows
        ]
        if not sizes:
            return entries
        out = []
        for entry in entries:
            picture = self.fetch_image(entry)
            out.append(dataclasses.replace(entry, width=picture.width, height=picture.height))
        return out

    def fetch_image(self, entry: ImageEntry | str) -> Picture:
        """The bytes behind ``entry.url``, decoded by Pillow.

        Raises:
            AssertionError: the bytes are no image (with what came instead).
        """
        from PIL import Image, UnidentifiedImageError

        url = entry if isinstance(entry, str) else entry.url
        data, content_type = self.get(url)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return Picture(data, image.width, image.height, image.format or "")
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise AssertionError(
                f"{url} served {len(data)} bytes of {content_type!r} that Pillow cannot decode ({error}); "
                f"they start {data[:16]!r}"
            ) from None

    def histograms(self, run: str, tag: str) -> list[HistogramPoint]:
        rows = self.get_json("/data/plugin/histograms/histograms", {"run": run, "tag": tag})
        return [
            HistogramPoint(int(s), float(w), tuple((float(a), float(b), float(c)) for a, b, c in buckets))
            for w, s, buckets in rows
        ]

    def text(self, run: str, tag: str, *, markdown: bool = True) -> list[TextPoint]:
        """The text series (an unknown tag gives ``[]``: TensorBoard does not 404 here)."""
        params = {"run": run, "tag": tag, **({} if markdown else {"markdown": "false"})}
        rows = self.get_json("/data/plugin/text/text", params)
        return [TextPoint(int(row["step"]), float(row["wall_time"]), row["text"]) for row in rows]

    def custom_scalars_layout(self) -> dict[str, Any]:
        """The merged layout as JSON (``{}`` when none was written)."""
        return self.get_json("/data/plugin/custom_scalars/layout")

    def custom_scalars(self, run: str, pattern: str) -> dict[str, list[ScalarPoint]]:
        """What a custom-scalars chart draws for ``run``: ``{tag: points}``, the tags ``pattern`` matches."""
        body = self.get_json("/data/plugin/custom_scalars/scalars", {"run": run, "tag": pattern})
        if not body.get("regex_valid", False):
            raise ValueError(f"TensorBoard finds the custom-scalars regex {pattern!r} invalid")
        return {
            tag: [ScalarPoint(int(s), float(w), float(v)) for w, s, v in rows]
            for tag, rows in body.get("tag_to_events", {}).items()
        }


def wait_until(
    probe: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.25,
    *,
    until: Callable[[T], object] = bool,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = NOT_YET,
) -> T:
    """Call ``probe`` every ``interval`` s until ``until(value)`` holds; return that value.

    Errors in ``ignore`` count as "not yet" (a 404 before TensorBoard has read a tag).

    Raises:
        AssertionError: after ``timeout`` s, saying what was waited for and the last value or error seen.

    Example::

        >>> wait_until(lambda: [1, 2], timeout=1)
        [1, 2]
        >>> wait_until(lambda: 3, timeout=0.2, interval=0.05, until=lambda n: n > 3, what="n > 3")
        Traceback (most recent call last):
        ...
        AssertionError: timed out after 0.2 s (... tries) waiting for n > 3; last seen: 3
    """
    deadline = time.monotonic() + timeout
    tries, seen, error = 0, "nothing", None
    while True:
        tries += 1
        try:
            value = probe()
        except ignore as caught:
            error = caught
        else:
            if until(value):
                return value
            seen, error = _short_repr(value), None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    name = what or getattr(probe, "__qualname__", repr(probe))
    message = f"timed out after {timeout:g} s ({tries} tries) waiting for {name}; last seen: {seen}"
    if error is not None:
        message += f"; the last try raised {type(error).__name__}: {error}"
    raise AssertionError(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    pgid: int
    state: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.pid} [{self.state}] {' '.join(self.argv)[:200]}"


def processes() -> list[Process]:
    """Every live (non-zombie) process on this machine, from ``/proc``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may contain spaces
        state, ppid, pgid = fields[0], int(fields[1]), int(fields[2])
        if state in ("Z", "X"):
            continue
        args = tuple(a.decode("utf-8", "replace") for a in argv if a)
        out.append(Process(int(entry), ppid, pgid, state, args))
    return out


def processes_mentioning(text: str) -> list[Process]:
    """Live processes with ``text`` in their command line (a log folder or a browser profile of a test)."""
    own = os.getpid()
    return [p for p in processes() if p.pid != own and any(text in arg for arg in p.argv)]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout: float) -> list[Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in processes() if p.pgid == pgid]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------- misc
def _chart_patterns(chart: Mapping[str, Any]) -> list[str]:
    if "multiline" in chart:
        return list(chart["multiline"].get("tag", []))
    if "margin" in chart:
        series = chart["margin"].get("series", [])
        return [s[k] for s in series for k in ("value", "lower", "upper") if k in s]
    return []


def _short_repr(value: object, limit: int = 1500) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _TextOnly(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _strip_html(markup: str) -> str:
    parser = _TextOnly()
    parser.feed(markup)
    parser.close()
    return " ".join(" ".join(parser.parts).split())

