"""Screenshots of TensorBoard itself for the README: ``python docs/screenshots.py [--logdir DIR]``.

Without ``--logdir`` it first trains the vanishing-gradients example with its default settings (a few
minutes on 2 CPU cores) into a temporary folder. Then it starts a real TensorBoard on that folder (the
Rust data server, TensorBoard's default), opens its Images, Time Series and Custom Scalars dashboards in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, and ``selenium``) in a 1600x1200 window,
as a user sees them (no "Show actual image size"), and saves ``docs/tensorboard_images.png``,
``docs/tensorboard_time_series.png`` and ``docs/tensorboard_custom_scalars.png``.

``python docs/screenshots.py --explorer [--logdir DIR]`` trains the seq2seq example instead (its default
settings) and saves the explorer's tab: ``docs/explorer_hidden.png`` (the encoder's units on a source
string, the units selected on one step and where they fire together), ``docs/explorer_gradients.png`` and
``docs/explorer_attention.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import browser  # noqa: E402
from tests.helpers.tensorboard_server import TensorBoardServer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", help="an existing log folder (default: train the example first)")
    parser.add_argument("--filter", default="rnnviz/(grad_norm|grad_decay|hidden)/",
                        help="tag filter typed into the Images dashboard")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--explorer", action="store_true", help="the RNNVIZ tab over the seq2seq example")
    opts = parser.parse_args(argv)
    if opts.explorer:
        explorer(opts.logdir, Path(opts.out))
        return
    logdir = opts.logdir
    if logdir is None:
        logdir = tempfile.mkdtemp(prefix="rnnviz-screenshots-")
        subprocess.run([sys.executable, str(ROOT / "examples/vanishing_gradients.py"), "--save-dir", logdir],
                       check=True)
    out = Path(opts.out)
    with TensorBoardServer(Path(logdir)) as board, browser.chromium(window_size=(1600, 1200)) as driver:
        cards = browser.image_cards(driver, board, tag_filter=opts.filter)
        print(f"{len(cards)} image cards, all loaded: {all(c.loaded for c in cards)}")
        browser.screenshot(driver, out / "tensorboard_images.png")
        cards = browser.image_cards(driver, board, tag_filter=opts.filter, dashboard="timeseries")
        print(f"{len(cards)} Time Series image cards, all loaded: {all(c.loaded for c in cards)}")
        from selenium.webdriver.common.keys import Keys  # close the filter's suggestions over the cards

        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        driver.execute_script("document.activeElement && document.activeElement.blur()")
        browser.screenshot(driver, out / "tensorboard_time_series.png")
        charts = browser.custom_scalar_charts(driver, board)
        print(f"{len(charts)} custom-scalar charts in {len({c.category for c in charts})} sections")
        browser.screenshot(driver, out / "tensorboard_custom_scalars.png")


def explorer(logdir: str | None, out: Path) -> None:
    """The RNNVIZ tab of a real TensorBoard over the seq2seq example's last validation probe set."""
    from selenium.webdriver.common.action_chains import ActionChains

    if logdir is None:
        logdir = tempfile.mkdtemp(prefix="rnnviz-explorer-")
        subprocess.run([sys.executable, str(ROOT / "examples/seq2seq_attention.py"), "--save-dir", logdir],
                       check=True)
    with TensorBoardServer(Path(logdir)) as board, browser.chromium(window_size=(1600, 1200)) as driver:
        driver.get(f"{board.url}/#rnnviz")
        frame = _until(lambda: driver.find_elements("css selector", "iframe"))[0]
        driver.switch_to.frame(frame)
        _until(lambda: driver.execute_script("return document.body.dataset.rnnvizReady === '1'"))

        def choose(element_id: str, value: object) -> None:
            driver.execute_script("""const e = document.getElementById(arguments[0]); e.value = arguments[1];
                e.dispatchEvent(new Event(e.tagName === 'SELECT' ? 'change' : 'input'));""", element_id, str(value))
            time.sleep(0.3)

        def shoot(element_id: str | None, name: str) -> None:
            driver.execute_script("document.getElementById('rnnviz-tooltip').hidden = true;")  # no hover shown
            driver.execute_script("const e = arguments[0] && document.getElementById(arguments[0]); "
                                  "e ? e.scrollIntoView({block: 'start'}) : window.scrollTo(0, 0);", element_id)
            time.sleep(0.3)
            browser.screenshot(driver, out / name)
            print(f"saved {out / name}")

        choose("rnnviz-tag", "rnnviz/probe_set/val")
        choose("rnnviz-module", "encoder.rnn")
        choose("rnnviz-sort", "variance")
        # one step of the first sequence, the threshold at 0.5: the units that switch on there, and where else
        choose("rnnviz-threshold", 0.5)
        canvas = driver.find_element("id", "rnnviz-heatmap")
        d = driver.execute_script("const c = document.getElementById('rnnviz-heatmap'); const r = "
                                  "c.getBoundingClientRect(); return Object.assign({w: r.width, h: r.height}, c.dataset);")
        x = int(d["left"]) + 4 * int(d["cellWidth"]) + int(d["cellWidth"]) / 2 - d["w"] / 2
        y = int(d["top"]) + int(d["cellHeight"]) / 2 - d["h"] / 2
        ActionChains(driver).move_to_element_with_offset(canvas, int(x), int(y)).click().perform()
        time.sleep(0.5)
        print("selected units:", driver.execute_script(
            "return Array.from(document.querySelectorAll('#rnnviz-selected li[data-unit]')).map(l => l.dataset.unit)"))
        shoot(None, "explorer_hidden.png")
        choose("rnnviz-tag", "rnnviz/probe_set/train")
        choose("rnnviz-module", "encoder.rnn")
        shoot("rnnviz-gradient-view", "explorer_gradients.png")
        choose("rnnviz-tag", "rnnviz/probe_set/val")
        shoot("rnnviz-attention", "explorer_attention.png")


def _until(probe, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError("the explorer did not load")


if __name__ == "__main__":
    main()
