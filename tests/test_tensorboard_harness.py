"""The TensorBoard harness itself, with both loaders: what a live TensorBoard serves is what was written,
while it is written, and what its pages show; two ways of writing that TensorBoard does not show correctly."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from tests.helpers import browser
from tests.helpers.tensorboard_server import (
    LOADERS,
    TensorBoardHTTPError,
    TensorBoardServer,
    TensorBoardStartupError,
    processes,
    processes_mentioning,
    wait_until,
)

pytestmark = pytest.mark.slow

# (height, width) of each image tag's picture at a step: every step a different size.
IMAGE_SIZES: dict[str, Callable[[int], tuple[int, int]]] = {
    "rnnviz/hidden/rnn": lambda step: (24 + 4 * step, 40 + 6 * step),
    "rnnviz/grad_norm/rnn": lambda step: (30 - 2 * step, 72 - 8 * step),
}
HISTOGRAM_TAG = "rnnviz/hidden_values/rnn"  # not an image tag: see the pitfall test below
SCALAR_TAG = "rnnviz/hidden/rnn/mean_abs"
TEXT_TAG = "rnnviz/notes/text_summary"  # torch's add_text appends /text_summary
HISTOGRAM_VALUES = 200
LAYOUT = {"rnnviz": {"loss": ["Multiline", ["train_loss"]],
                    "hidden mean": ["Multiline", ["rnnviz/hidden/.*"]]}}
# What each phase of the writer adds: image steps and train_loss steps.
PHASES = (((0,), range(7)), ((1,), range(7, 14)), ((2, 3), range(14, 20)))
IMAGE_STEPS = [s for images, _ in PHASES for s in images]


def picture(tag: str, step: int) -> np.ndarray:
    """A recognisable ``(height, width, 3)`` picture: two gradients and a band per step."""
    height, width = IMAGE_SIZES[tag](step)
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    rgb[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    rgb[..., 2] = 50 * step + (90 if "hidden" in tag else 0)
    return rgb


def note(step: int) -> str:
    return f"step **{step}**\n\n| unit | mean |\n|---|---|\n| 0 | {step / 10:.1f} |"


class LiveWriter(threading.Thread):
    """Writes the two runs phase by phase on its own thread; the writers stay open until `finish`."""

    def __init__(self, logdir: Path) -> None:
        super().__init__(daemon=True)
        self.logdir = logdir
        self._asked: list[threading.Event] = [threading.Event() for _ in PHASES]
        self._written: list[threading.Event] = [threading.Event() for _ in PHASES]
        self.error: BaseException | None = None

    def write_phase(self, index: int) -> None:
        self._asked[index].set()
        if not self._written[index].wait(30) or self.error is not None:
            raise AssertionError(f"the writer thread failed in phase {index}: {self.error!r}")

    def finish(self) -> None:
        for event in self._asked:
            event.set()
        self.join(30)
        assert not self.is_alive(), "the writer thread did not finish"

    def run(self) -> None:
        rng = np.random.default_rng(0)
        try:
            with contextlib.ExitStack() as open_writers:
                main = SummaryWriter(self.logdir / "run_a")
                open_writers.callback(main.close)
                sub = SummaryWriter(self.logdir / "run_a" / "sub")
                open_writers.callback(sub.close)
                for index, (image_steps, loss_steps) in enumerate(PHASES):
                    self._asked[index].wait(60)
                    if index == 0:
                        sub.add_custom_scalars(LAYOUT)
                    for step in loss_steps:
                        main.add_scalar("train_loss", 1.0 / (step + 1), step)
                    for step in image_steps:
                        for tag in IMAGE_SIZES:
                            sub.add_image(tag, picture(tag, step), step, dataformats="HWC")
                        sub.add_scalar(SCALAR_TAG, 0.5 + step, step)
                        sub.add_histogram(HISTOGRAM_TAG, rng.normal(size=HISTOGRAM_VALUES), step)
                        sub.add_text("rnnviz/notes", note(step), step)
                    main.flush()
                    sub.flush()
                    self._written[index].set()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            self.error = error
        finally:
            for event in self._written:
                event.set()


@dataclass
class Board:
    server: TensorBoardServer
    logdir: Path
    seen: list[dict[str, int]] = field(default_factory=list)  # counts served after each phase
    latency_s: list[float] = field(default_factory=list)  # from the phase's flush to all of it served


def counts(server: TensorBoardServer) -> dict[str, int]:
    def n(read: Callable[[], list]) -> int:
        try:
            return len(read())
        except TensorBoardHTTPError:  # 404 until TensorBoard has read the tag
            return 0

    out = {tag: n(lambda tag=tag: server.images("run_a/sub", tag, sizes=False)) for tag in IMAGE_SIZES}
    out["train_loss"] = n(lambda: server.scalars("run_a", "train_loss"))
    out["histogram"] = n(lambda: server.histograms("run_a/sub", HISTOGRAM_TAG))
    out["text"] = len(server.text("run_a/sub", TEXT_TAG))
    return out


def expected_counts(phase: int) -> dict[str, int]:
    images = sum(len(PHASES[i][0]) for i in range(phase + 1))
    losses = sum(len(PHASES[i][1]) for i in range(phase + 1))
    return {**dict.fromkeys(IMAGE_SIZES, images), "train_loss": losses, "histogram": images, "text": images}


def assert_nothing_left(logdir: Path) -> None:
    left = processes_mentioning(str(logdir))
    assert not left, f"processes still running on {logdir}: {[str(p) for p in left]}"


@pytest.fixture(scope="module", params=LOADERS)
def board(request, tmp_path_factory) -> Iterator[Board]:
    """A TensorBoard started on an empty folder, then the runs written phase by phase while it watches."""
    logdir = tmp_path_factory.mktemp(f"live-{request.param}")
    server = TensorBoardServer(logdir, loader=request.param, log_dir=logdir.parent / f"{logdir.name}-log")
    with server:
        result = Board(server, logdir)
        writer = LiveWriter(logdir)
        writer.start()
        try:
            for phase in range(len(PHASES)):
                writer.write_phase(phase)
                flushed = time.monotonic()
                want = expected_counts(phase)
                result.seen.append(wait_until(lambda: counts(server), 20, 0.1, until=lambda c, w=want: c == w,
                                              what=f"phase {phase}'s records ({want})"))
                result.latency_s.append(time.monotonic() - flushed)
        finally:
            writer.finish()
        yield result
    assert_nothing_left(logdir)


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    paths = browser.require_chromium()
    with browser.chromium(paths) as chrome:
        yield chrome


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    """Where screenshots go: ``$RNNVIZ_SCREENSHOT_DIR`` to look at them later, else the test's tmp_path."""
    return Path(os.environ.get("RNNVIZ_SCREENSHOT_DIR") or tmp_path)


def test_counts_grow_while_the_writer_is_open(board):
    assert board.server.data_provider == board.server.loader
    assert board.seen == [expected_counts(phase) for phase in range(len(PHASES))]
    hidden = [seen["rnnviz/hidden/rnn"] for seen in board.seen]
    assert hidden == sorted(set(hidden)) and hidden[0] > 0  # strictly growing
    assert board.server.runs() == ["run_a", "run_a/sub"]  # both appeared after TensorBoard started
    assert max(board.latency_s) < 10


def test_tags_are_the_same_with_both_loaders(board):
    def names(plugin: str) -> dict[str, set[str]]:
        return {run: set(tags) for run, tags in board.server.tags(plugin).items()}

    assert names("scalars") == {"run_a": {"train_loss"}, "run_a/sub": {SCALAR_TAG}}
    assert names("images") == {"run_a/sub": set(IMAGE_SIZES)}
    assert names("histograms") == names("distributions") == {"run_a/sub": {HISTOGRAM_TAG}}
    assert names("text") == {"run_a/sub": {TEXT_TAG}}
    assert names("custom_scalars") == {"run_a": {"train_loss"}, "run_a/sub": {SCALAR_TAG}}
    images = board.server.tags("images")["run_a/sub"]
    assert {info.samples for info in images.values()} == {1}
    # The one difference: a summary that names no display name (torch's never do).
    want = "" if board.server.loader == "rust" else "rnnviz/hidden/rnn"
    assert images["rnnviz/hidden/rnn"].display_name == want
    assert board.server.tags("custom_scalars")["run_a"]["train_loss"].display_name == "loss"


def test_every_image_decodes_to_what_was_written(board):
    for tag, size in IMAGE_SIZES.items():
        entries = board.server.images("run_a/sub", tag)
        assert [e.step for e in entries] == IMAGE_STEPS
        assert [(e.height, e.width) for e in entries] == [size(step) for step in IMAGE_STEPS]
        for entry in entries:
            assert entry.url.startswith(f"{board.server.url}/data/plugin/images/individualImage?blob_key=")
            fetched = board.server.fetch_image(entry)
            assert fetched.format == "PNG" and fetched.data.startswith(b"\x89PNG")
            np.testing.assert_array_equal(fetched.pixels()[..., :3], picture(tag, entry.step))
        assert board.server.images("run_a/sub", tag, sample=1) == []  # one image per step


def test_scalars_histograms_text_and_layout_are_served(board):
    loss = board.server.scalars("run_a", "train_loss")
    assert [p.step for p in loss] == list(range(20))
    assert [p.value for p in loss] == pytest.approx([1.0 / (s + 1) for s in range(20)], rel=1e-6)
    histograms = board.server.histograms("run_a/sub", HISTOGRAM_TAG)
    assert [h.step for h in histograms] == IMAGE_STEPS
    assert {h.total for h in histograms} == {HISTOGRAM_VALUES}
    texts = board.server.text("run_a/sub", TEXT_TAG)
    assert [t.step for t in texts] == IMAGE_STEPS
    assert texts[2].plain == "step 2 unit mean 0 0.2"
    assert "<strong>2</strong>" in texts[2].html and "<th>unit</th>" in texts[2].html
    assert board.server.text("run_a/sub", "no/such/tag") == []  # TensorBoard answers 200 [], not 404
    layout = board.server.custom_scalars_layout()
    assert [c["title"] for c in layout["category"]] == ["rnnviz"]
    charts = {chart["title"]: chart["multiline"]["tag"] for chart in layout["category"][0]["chart"]}
    assert charts == {"loss": ["train_loss"], "hidden mean": ["rnnviz/hidden/.*"]}
    assert list(board.server.custom_scalars("run_a/sub", "rnnviz/hidden/.*")) == [SCALAR_TAG]
    with pytest.raises(TensorBoardHTTPError, match="404"):
        board.server.scalars("run_a/sub", "train_loss")


@pytest.mark.browser
def test_the_images_dashboard_shows_one_loaded_card_per_image_tag(board, driver, screenshot_dir):
    last = IMAGE_STEPS[-1]
    # Time Series, the page TensorBoard opens on, once: with the default loader (it costs 3 s a look).
    for dashboard in ("images", "timeseries") if board.server.loader == "rust" else ("images",):
        cards = browser.image_cards(driver, board.server, tag_filter="rnnviz/", dashboard=dashboard,
                                    expect=len(IMAGE_SIZES))
        assert [c.tag for c in cards] == sorted(IMAGE_SIZES)
        for card in cards:
            assert card.run == "run_a/sub" and card.loaded and card.step == last
            assert (card.natural_height, card.natural_width) == IMAGE_SIZES[card.tag](last)
            assert card.shown_width > 0 and card.shown_height > 0
            if dashboard == "images":
                assert card.steps == len(IMAGE_STEPS)  # the slider offers every step
        path = screenshot_dir / f"{dashboard}-{board.server.loader}.png"
        width, height = browser.screenshot(driver, path)  # the page: the 1600x1200 window less its frame
        assert width == 1600 and 800 < height <= 1200
        assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.browser
def test_the_custom_scalars_and_text_dashboards_show_what_was_written(board, driver, screenshot_dir):
    charts = browser.custom_scalar_charts(driver, board.server, expect=2)
    assert sorted((c.category, c.title, c.matches) for c in charts) == [("rnnviz", "hidden mean", 1),
                                                                      ("rnnviz", "loss", 1)]
    browser.screenshot(driver, screenshot_dir / f"custom_scalars-{board.server.loader}.png")
    (card,) = browser.text_cards(driver, board.server, expect=1)
    assert (card.run, card.tag) == ("run_a/sub", TEXT_TAG)
    assert [e.step for e in card.entries] == IMAGE_STEPS[::-1]  # newest first
    assert card.entries[0].tables == ((("unit", "mean"), ("0", "0.3")),)
    assert card.entries[0].text.startswith("step 3")


# --------------------------------------------------------------------------------------- pitfalls
CLASH_TAG = "rnnviz/hidden/rnn"


class RawEventFile:
    """An event file under a name of our choosing (torch's names order by time, pid and a counter)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "ab")  # noqa: SIM115 - closed in `close`
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> RawEventFile:
        self._write(Event(wall_time=time.time(), step=step,
                          summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))
        return self

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@pytest.fixture(scope="module", params=LOADERS)
def pitfall_board(request, tmp_path_factory) -> Iterator[TensorBoardServer]:
    """Two runs that write one tag both as an image and as a histogram at the same steps, in either order."""
    logdir = tmp_path_factory.mktemp(f"pitfall-{request.param}")
    rng = np.random.default_rng(1)
    for run, order in (("image_first", "ih"), ("histogram_first", "hi")):
        writer = SummaryWriter(logdir / run)
        for step in range(2):
            for kind in order:
                if kind == "i":
                    writer.add_image(CLASH_TAG, np.full((6, 10, 3), 200, np.uint8), step, dataformats="HWC")
                else:
                    writer.add_histogram(CLASH_TAG, rng.normal(size=50), step, bins=10)
        writer.close()
    with TensorBoardServer(logdir, loader=request.param) as server:
        # Both loaders answer 200 here once image_first is read (Rust with no images at all); the runs
        # are read in one reload, so one more interval leaves histogram_first read too.
        wait_until(lambda: server.images("image_first", CLASH_TAG, sizes=False) is not None, 20, 0.1,
                   what="image_first read")
        time.sleep(server.reload_interval)
        yield server
    assert_nothing_left(logdir)


def test_one_tag_as_image_and_histogram_is_not_shown_correctly(pitfall_board):
    """Never write an image and a histogram under one tag: no loader shows both, Rust shows neither."""
    server = pitfall_board

    def served(read: Callable[[], list]) -> object:
        try:
            return [item.step for item in read()]
        except TensorBoardHTTPError as error:
            return error.status

    runs = ("image_first", "histogram_first")
    images = {run: served(lambda run=run: server.images(run, CLASH_TAG)) for run in runs}
    histograms = {run: served(lambda run=run: server.histograms(run, CLASH_TAG)) for run in runs}
    listed_images = {run: {tag: info.samples for tag, info in tags.items()}
                     for run, tags in server.tags("images").items()}
    listed_histograms = {run: set(tags) for run, tags in server.tags("histograms").items()}
    if server.loader == "rust":
        # The kind seen first owns the tag; the other kind's record at the same step empties the series.
        assert images == {"image_first": [], "histogram_first": 404}
        assert histograms == {"image_first": 404, "histogram_first": []}
        assert listed_images == {} and listed_histograms == {}  # nothing to see on either dashboard
    else:
        # Images first: the images show, but the histogram's 10 x 3 tensor makes TensorBoard promise 28
        # images per step (30 values less width and height), 27 of them empty cards; no histogram.
        assert images == {"image_first": [0, 1], "histogram_first": 404}
        assert listed_images == {"image_first": {CLASH_TAG: 28}}
        assert server.images("image_first", CLASH_TAG, sample=1) == []
        # Histogram first: listed, but reading it fails inside TensorBoard (500), so nothing is drawn.
        assert histograms == {"image_first": 404, "histogram_first": 500}
        assert listed_histograms == {"histogram_first": {CLASH_TAG}}


@pytest.mark.browser
def test_the_images_dashboard_shows_the_clash_as_the_api_says(pitfall_board, driver, screenshot_dir):
    server = pitfall_board
    if server.loader == "rust":
        notice = browser.empty_dashboard_message(driver, server, "images")
        assert notice.startswith("No image data was found.")
        assert browser.read_image_cards(driver) == []
    else:
        # A page of cards (12 of the 28 promised), only the first with a picture.
        cards = browser.image_cards(driver, server, expect=12, loaded=False)
        assert {(c.run, c.tag, c.of_samples) for c in cards} == {("image_first", CLASH_TAG, 28)}
        assert [c.sample for c in cards if c.loaded] == [0]
        assert {c.natural_width for c in cards if not c.loaded} == {0}
    browser.screenshot(driver, screenshot_dir / f"clash-{server.loader}.png")


def test_python_loader_follows_only_the_last_event_file_of_a_run(pitfall_board, tmp_path):
    """Two event files in one run folder: records appended to the earlier one (by name) stay invisible to
    the Python loader while TensorBoard runs; Rust reads both."""
    server = pitfall_board
    folder = Path(server.logdir) / "two_files"
    folder.mkdir()
    earlier = RawEventFile(folder / "events.out.tfevents.0000000001.host.1.a")
    later = RawEventFile(folder / "events.out.tfevents.0000000002.host.1.b")
    try:
        earlier.scalar("a", 0.0, 0).flush()
        later.scalar("b", 0.0, 0).flush()

        def steps(tag: str) -> list[int]:
            return [p.step for p in server.scalars("two_files", tag)]

        wait_until(lambda: (steps("a"), steps("b")), 20, 0.1, until=lambda seen: seen == ([0], [0]),
                   what="a@0 and b@0")
        for step in range(1, 5):
            earlier.scalar("a", float(step), step)
        earlier.scalar("a_late", 1.0, 0).flush()
        later.scalar("b", 1.0, 1).scalar("b", 2.0, 2).flush()
        wait_until(lambda: steps("b"), 20, 0.1, until=lambda s: s == [0, 1, 2], what="b@0..2")
        if server.loader == "rust":
            wait_until(lambda: (steps("a"), set(server.tags("scalars")["two_files"])), 20, 0.1,
                       until=lambda seen: seen == ([0, 1, 2, 3, 4], {"a", "a_late", "b"}), what="all of a")
        else:
            time.sleep(2 * server.reload_interval)  # two more reloads: still not read
            assert steps("a") == [0]
            assert set(server.tags("scalars")["two_files"]) == {"a", "b"}
    finally:
        earlier.close()
        later.close()


# ------------------------------------------------------------------------------------ the harness
def test_a_silent_fallback_to_the_python_loader_fails_the_start(tmp_path):
    """Under --load_fast=auto TensorBoard quietly serves with Python when the data server cannot start."""
    server = TensorBoardServer(tmp_path / "logs", loader="rust", extra_flags=["--load_fast=auto"],
                               env={"TENSORBOARD_DATA_SERVER_BINARY": "/bin/false"})
    (tmp_path / "logs").mkdir()
    with pytest.raises(TensorBoardStartupError, match="serves from .MultiplexerDataProvider"):
        server.start()
    assert server.pid is None
    assert_nothing_left(tmp_path / "logs")


def test_a_data_server_that_cannot_start_fails_loudly(tmp_path):
    server = TensorBoardServer(tmp_path, loader="rust", env={"TENSORBOARD_DATA_SERVER_BINARY": "/bin/false"})
    with pytest.raises(TensorBoardStartupError, match=r"exited with 1(.|\n)*Could not start data server"):
        server.start()
    assert_nothing_left(tmp_path)


def test_stop_ends_tensorboard_and_its_data_server(tmp_path):
    server = TensorBoardServer(tmp_path, loader="rust").start()
    pids = {server.pid, *server.data_server_pids()}
    assert len(pids) == 2
    server.stop()
    assert not [p for p in processes() if p.pid in pids]
    assert_nothing_left(tmp_path)
    server.stop()  # a second stop does nothing


def test_wait_until_says_what_it_saw_last():
    calls = iter([TensorBoardHTTPError(404, "u", "text/plain", b"Not found: no tag"), [1]])

    def probe() -> list[int]:
        item = next(calls, [1])
        if isinstance(item, Exception):
            raise item
        return item

    assert wait_until(probe, 2, 0.01) == [1]
    with pytest.raises(AssertionError, match=r"waiting for two items; last seen: \[1\]"):
        wait_until(lambda: [1], 0.2, 0.05, until=lambda v: len(v) == 2, what="two items")
    with pytest.raises(AssertionError, match="last try raised TensorBoardHTTPError: HTTP 404"):
        wait_until(probe_404, 0.2, 0.05)


def probe_404() -> None:
    raise TensorBoardHTTPError(404, "http://127.0.0.1:1/x", "text/plain", b"Not found")


def test_chromium_is_required_under_ci(monkeypatch):
    monkeypatch.setenv("RNNVIZ_CHROMIUM", "/nonexistent/chromium")
    assert browser.find_chromium() is None
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium chromium-driver"):
        browser.require_chromium()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="pip install selenium"):
        browser.require_chromium()
