"""Headless Chromium looking at a `TensorBoardServer`, to check what a person sees in TensorBoard's pages.

Chromium and ChromeDriver come from Debian (``apt-get install chromium chromium-driver``), selenium from the
``test`` extra. ChromeDriver is always given by path, so selenium never runs Selenium Manager (which would
download a driver). Every browser gets a fresh profile in a temporary folder and its own process group; all
of its processes are gone when `chromium` returns.

TensorBoard 2.21's page is an Angular app. Its Time Series dashboard (``/#timeseries``, the default) is
Angular too, in the light DOM: ``image-card-component`` holds the tag in ``tb-truncated-path``, the run in
``card-run-name-component`` and the picture in ``.img-container img``. The legacy dashboards
(``/#images``, ``/#custom_scalars``, ``/#text``, ...) are Polymer custom elements, each behind shadow roots
nested several deep (``tf-image-dashboard`` > ``tf-category-paginated-view`` > ``tf-image-loader`` >
``img``), out of reach of ``document.querySelectorAll`` and of selenium's CSS selectors. The scripts here
walk every shadow root (``deepAll``) and read the Polymer elements' own properties (``run``, ``tag``,
``_steps``, ``_currentStep`` of ``tf-image-loader``), which are what the card displays. An ``<img>`` counts
as loaded when ``complete`` and ``naturalWidth > 0``: a broken or missing PNG has ``naturalWidth == 0``.

Example::

    paths = require_chromium()          # skips (fails under CI=true) when Chromium is missing
    with TensorBoardServer(logdir) as board, chromium(paths) as driver:
        cards = image_cards(driver, board, tag_filter="rnnviz/", expect=2)
        assert all(card.loaded for card in cards)
        screenshot(driver, tmp_path / "images.png")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.helpers.tensorboard_server import TensorBoardServer, processes, processes_mentioning, wait_until

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # we run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the machine's closed network refuses Chromium's calls home
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # only 127.0.0.1 is visited
)
WINDOW_SIZE = (1600, 1200)
INSTALL_HINT = (
    "`apt-get install chromium chromium-driver` (Debian) and `pip install selenium` "
    "(or `pip install -e .[test]`)"
)
# Debian's /usr/bin/chromium is a shell wrapper that sources /etc/chromium.d (extra flags, extensions);
# the binary behind it is started directly when it is there.
_BROWSERS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "chromium", "chromium-browser",
             "google-chrome")
_DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver", "chromedriver")


@dataclass(frozen=True)
class ChromiumPaths:
    browser: str
    driver: str


@dataclass(frozen=True)
class ImageCard:
    """One image card as the page shows it."""

    tag: str
    run: str
    loaded: bool  # the <img> is complete with naturalWidth > 0
    natural_width: int
    natural_height: int
    shown_width: float  # size on the page, CSS pixels (0 when hidden)
    shown_height: float
    step: int | None  # the step the card shows
    steps: int | None  # steps its slider offers (legacy dashboard only)
    sample: int | None  # which image of a step (legacy dashboard only)
    of_samples: int | None  # images per step, as TensorBoard believes (legacy dashboard only)
    category: str  # the group the card is in: a tag prefix, or the filter's search results
    visible: bool  # the card is laid out (Time Series keeps filtered-out cards in the page, hidden)
    search_result: bool  # in the group of tags matching the filter (legacy dashboard)


@dataclass(frozen=True)
class ChartCard:
    """One chart of the Custom Scalars dashboard."""

    category: str
    title: str
    matches: int | None  # "Matches (n)": run/tag series the chart's regexes found
    lines: int  # SVG line paths drawn


@dataclass(frozen=True)
class TextEntry:
    step: int | None
    text: str  # rendered text, whitespace collapsed
    tables: tuple[tuple[tuple[str, ...], ...], ...]  # innermost tables: rows of cell texts


@dataclass(frozen=True)
class TextCard:
    tag: str
    run: str
    entries: tuple[TextEntry, ...]


def find_chromium() -> ChromiumPaths | None:
    """Chromium and ChromeDriver (``$RNNVIZ_CHROMIUM`` / ``$RNNVIZ_CHROMEDRIVER`` first), or ``None``
    when either, or selenium, is missing."""
    if _missing():
        return None
    return ChromiumPaths(_which(_browsers()), _which(_drivers()))  # type: ignore[arg-type]


def require_chromium() -> ChromiumPaths:
    """`find_chromium` for a test: skips with how to install when missing; under ``CI=true`` fails instead."""
    import pytest

    paths = find_chromium()
    if paths is not None:
        return paths
    reason = f"headless Chromium not usable ({', '.join(_missing())} missing); install it with {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}. CI=true, so this is a failure, not a skip.", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def chromium(paths: ChromiumPaths | None = None, *, window_size: tuple[int, int] = WINDOW_SIZE,
             timeout: float = 30.0) -> Iterator[Any]:
    """A headless Chromium (a selenium ``WebDriver``) with a fresh profile; quit and reaped afterwards.

    Raises:
        RuntimeError: at exit, when any of its processes outlived it.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    paths = paths or find_chromium()
    if paths is None:
        raise RuntimeError(f"Chromium, ChromeDriver or selenium missing: install them with {INSTALL_HINT}")
    profile = tempfile.mkdtemp(prefix="tensorboard-harness-chromium-")
    options = Options()
    options.binary_location = paths.browser
    size = f"--window-size={window_size[0]},{window_size[1]}"
    for flag in (*CHROMIUM_FLAGS, size, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(paths.driver, log_output=os.path.join(profile, "chromedriver.log"),
                      popen_kw={"start_new_session": True})
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(timeout)
        driver.set_script_timeout(timeout)
        yield driver
    finally:
        pgid = service.process.pid if getattr(service, "process", None) else None
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        else:
            with contextlib.suppress(Exception):
                service.stop()
        left = _reap(profile, pgid)
        shutil.rmtree(profile, ignore_errors=True)
        if left:
            raise RuntimeError(f"Chromium left processes behind: {[str(p) for p in left]}")


def open_dashboard(driver: Any, server: TensorBoardServer, dashboard: str) -> None:
    """Load TensorBoard afresh at ``/#<dashboard>`` (``timeseries``, ``images``, ``custom_scalars``, ...)."""
    driver.get("about:blank")  # a new hash on the same page would not reload it
    driver.get(f"{server.url}/#{dashboard}")


def image_cards(driver: Any, server: TensorBoardServer, *, tag_filter: str | None = None,
                dashboard: Literal["images", "timeseries"] = "images", expect: int | None = None,
                loaded: bool = True, timeout: float = 30.0) -> list[ImageCard]:
    """Open an images dashboard, type ``tag_filter`` into its tag filter, wait for the cards; return them.

    Waits until there is at least one card (``expect`` of them, when given), every card's picture has
    loaded (unless ``loaded`` is false: then cards without a picture are returned too), and two looks in
    a row agree. With a filter, the legacy dashboard's other groups stay on the page below the matches;
    only the matches are returned.

    Raises:
        AssertionError: after ``timeout`` s, with the cards last seen.
    """
    open_dashboard(driver, server, dashboard)
    if tag_filter:
        host = "tf-tag-filterer" if dashboard == "images" else "metrics-tag-filter"
        _type_into(driver, host, tag_filter, timeout)
    looks: list[list[ImageCard]] = []

    def look() -> list[ImageCard]:
        cards = read_image_cards(driver, dashboard)
        if tag_filter and dashboard == "images":
            cards = [c for c in cards if c.search_result]
        looks.append(cards)
        return cards

    def settled(cards: list[ImageCard]) -> bool:
        enough = bool(cards) if expect is None else len(cards) == expect
        return (enough and (not loaded or all(c.loaded for c in cards))
                and len(looks) > 1 and looks[-2] == cards)

    return wait_until(look, timeout, 0.25, until=settled, ignore=_js_errors(),
                      what=f"{expect or 'some'} {'loaded ' if loaded else ''}image cards on /#{dashboard} "
                           f"(filter {tag_filter!r})")


def read_image_cards(driver: Any, dashboard: Literal["images", "timeseries"] = "images") -> list[ImageCard]:
    """The image cards the page shows now (laid out, not hidden), by run and tag; no waiting."""
    script = _LEGACY_IMAGE_CARDS if dashboard == "images" else _TIMESERIES_IMAGE_CARDS
    cards = [ImageCard(**raw) for raw in driver.execute_script(_DEEP + script)]
    return sorted((c for c in cards if c.visible), key=lambda c: (c.run, c.tag, c.sample or 0))


def empty_dashboard_message(driver: Any, server: TensorBoardServer, dashboard: str, *,
                            timeout: float = 30.0) -> str:
    """Open ``/#<dashboard>`` and wait for its "No ... data was found." notice; return the notice."""
    open_dashboard(driver, server, dashboard)
    return wait_until(lambda: driver.execute_script(_DEEP + _NO_DATA), timeout, 0.25, ignore=_js_errors(),
                      what=f"the no-data notice of /#{dashboard}")


def custom_scalar_charts(driver: Any, server: TensorBoardServer, *, expect: int | None = None,
                         timeout: float = 30.0) -> list[ChartCard]:
    """Open ``/#custom_scalars`` and return its charts once each has drawn its lines."""
    open_dashboard(driver, server, "custom_scalars")

    def ready(charts: list[ChartCard]) -> bool:
        enough = bool(charts) if expect is None else len(charts) == expect
        return enough and all(c.lines > 0 for c in charts)

    return wait_until(lambda: [ChartCard(**raw) for raw in driver.execute_script(_DEEP + _CHARTS)],
                      timeout, 0.25, until=ready, ignore=_js_errors(),
                      what=f"{expect or 'some'} drawn custom-scalar charts")


def text_cards(driver: Any, server: TensorBoardServer, *, expect: int | None = None,
               timeout: float = 30.0) -> list[TextCard]:
    """Open ``/#text`` and return its cards, each with the rendered entries, newest step first as shown."""
    open_dashboard(driver, server, "text")

    def look() -> list[TextCard]:
        raw = driver.execute_script(_DEEP + _TEXT_CARDS)
        cards = [TextCard(c["tag"], c["run"], tuple(
            TextEntry(e["step"], e["text"], tuple(tuple(tuple(row) for row in t) for t in e["tables"]))
            for e in c["entries"])) for c in raw]
        return sorted(cards, key=lambda c: (c.run, c.tag))

    def ready(cards: list[TextCard]) -> bool:
        enough = bool(cards) if expect is None else len(cards) == expect
        return enough and all(c.entries for c in cards)

    return wait_until(look, timeout, 0.25, until=ready, ignore=_js_errors(),
                      what=f"{expect or 'some'} text cards with text")


def screenshot(driver: Any, path: str | os.PathLike[str]) -> tuple[int, int]:
    """Save what the window shows as a PNG at ``path``; returns its size (checked by decoding it)."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(os.fspath(path)):
        raise AssertionError(f"Chromium could not save a screenshot to {path}")
    with Image.open(path) as image:
        if image.format != "PNG":
            raise AssertionError(f"{path} is {image.format}, not PNG")
        return image.size


# ------------------------------------------------------------------------------------------ internals
def _browsers() -> tuple[str, ...]:
    env = os.environ.get("RNNVIZ_CHROMIUM")
    return (env,) if env else _BROWSERS


def _drivers() -> tuple[str, ...]:
    env = os.environ.get("RNNVIZ_CHROMEDRIVER")
    return (env,) if env else _DRIVERS


def _which(candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing() -> list[str]:
    missing = []
    if _which(_browsers()) is None:
        missing.append("Chromium")
    if _which(_drivers()) is None:
        missing.append("ChromeDriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    return missing


def _js_errors() -> tuple[type[BaseException], ...]:
    """What a look at a page still being built may raise: it is looked at again."""
    from selenium.common.exceptions import JavascriptException, StaleElementReferenceException

    return (JavascriptException, StaleElementReferenceException)


def _type_into(driver: Any, host: str, text: str, timeout: float) -> None:
    """Type ``text`` into the first ``<input>`` under the element ``host``, as a person would."""
    field = wait_until(lambda: driver.execute_script(_DEEP + _FIND_INPUT, host), timeout, 0.2,
                       ignore=_js_errors(),
                       what=f"the <input> of <{host}>")
    field.click()
    field.send_keys(text)


def _reap(profile: str, pgid: int | None) -> list[Any]:
    """End what is left of one browser: its driver's process group and anything using its profile."""

    def ours() -> list[Any]:
        return [p for p in processes() if (pgid is not None and p.pgid == pgid)
                or any(profile in a for a in p.argv)]

    deadline = time.monotonic() + 5.0
    while ours() and time.monotonic() < deadline:  # quit() is asynchronous for the renderer processes
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = ours()
        if not left:
            return []
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
        deadline = time.monotonic() + 3.0
        while ours() and time.monotonic() < deadline:
            time.sleep(0.05)
    return ours() + processes_mentioning(profile)


_DEEP = """
function deepAll(root, selector, out) {
  out = out || [];
  root.querySelectorAll(selector).forEach(e => out.push(e));
  root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) deepAll(e.shadowRoot, selector, out); });
  return out;
}
function deepFirst(root, selector) { const all = deepAll(root, selector); return all.length ? all[0] : null; }
function words(el) { return el ? (el.innerText || el.textContent || '').replace(/\\s+/g, ' ').trim() : ''; }
function loaded(img) { return !!img && img.complete && img.naturalWidth > 0; }
function box(el) {
  const r = el ? el.getBoundingClientRect() : null;
  return r ? [r.width, r.height] : [0, 0];
}
function orNull(v) { return v === undefined ? null : v; }
"""

_FIND_INPUT = """
const host = deepFirst(document, arguments[0]);
return host ? (deepFirst(host.shadowRoot || host, 'input') || deepFirst(host, 'input')) : null;
"""

_LEGACY_IMAGE_CARDS = """
return deepAll(document, 'tf-image-loader').map(el => {
  const img = el.shadowRoot ? el.shadowRoot.querySelector('img') : null;
  const steps = Array.isArray(el._steps) ? el._steps : null;
  const current = el._currentStep || null;
  const [w, h] = box(img);
  const view = el.closest('tf-category-paginated-view');
  const category = view && view.category ? view.category : {name: '', metadata: {}};
  return {tag: String(el.tag), run: String(el.run), loaded: loaded(img),
          natural_width: img ? img.naturalWidth : 0, natural_height: img ? img.naturalHeight : 0,
          shown_width: w, shown_height: h,
          step: current ? current.step : null, steps: steps ? steps.length : null,
          sample: orNull(el.sample), of_samples: orNull(el.ofSamples),
          category: String(category.name), search_result: category.metadata.type === 0,
          visible: box(el)[0] > 0};
});
"""

_TIMESERIES_IMAGE_CARDS = """
return deepAll(document, 'image-card-component').map(el => {
  const img = el.querySelector('.img-container img');
  const step = words(el.querySelector('.metadata .step')).replace(/[^0-9]/g, '');
  const [w, h] = box(img);
  const group = el.closest('.card-group');
  return {tag: words(el.querySelector('tb-truncated-path')).replace(/\\s+/g, ''),
          run: words(el.querySelector('card-run-name-component')), loaded: loaded(img),
          natural_width: img ? img.naturalWidth : 0, natural_height: img ? img.naturalHeight : 0,
          shown_width: w, shown_height: h, step: step ? Number(step) : null, steps: null,
          sample: null, of_samples: null,
          category: group ? words(group.querySelector('.group-title')) : '', search_result: false,
          visible: box(el)[0] > 0};
});
"""

_NO_DATA = """
return deepAll(document, '.no-data-warning').map(words).filter(t => t).join(' ');
"""

_CHARTS = """
const sel = 'tf-custom-scalar-multi-line-chart-card, tf-custom-scalar-margin-chart-card';
return deepAll(document, sel).map(el => {
  const view = el.closest('tf-category-paginated-view');
  const category = view ? words(view.shadowRoot.querySelector('.category-name')) : '';
  const matches = words(deepFirst(el.shadowRoot, '.matches-text')).match(/\\((\\d+)\\)/);
  const lines = deepAll(el.shadowRoot, '.line-plot path').filter(p => (p.getAttribute('d') || '').length > 2);
  return {category: category, title: words(deepFirst(el.shadowRoot, '.heading-label.name')),
          matches: matches ? Number(matches[1]) : null, lines: lines.length};
});
"""

_TEXT_CARDS = """
return deepAll(document, 'tf-text-loader').map(el => {
  const root = el.shadowRoot || el;
  const steps = Array.from(root.querySelectorAll('.step-container'))
    .map(s => words(s.querySelector('.step-value')));
  const texts = Array.from(root.querySelectorAll('.text')).map(t => {
    const view = t.querySelector('tf-markdown-view');
    const md = view && view.shadowRoot ? view.shadowRoot.querySelector('#markdown') : t;
    const inner = Array.from(md.querySelectorAll('table')).filter(tb => !tb.querySelector('table'));
    return {text: words(md), tables: inner.map(tb => Array.from(tb.querySelectorAll('tr')).map(
      tr => Array.from(tr.querySelectorAll('th, td')).map(words)))};
  });
  return {tag: String(el.tag), run: String(el.run), entries: texts.map((t, i) => ({
    step: steps[i] !== undefined && steps[i] !== '' ? Number(steps[i]) : null,
    text: t.text, tables: t.tables}))};
});
"""
