"""Screenshots of TensorBoard itself for the README: ``python docs/screenshots.py [--logdir DIR]``.

Without ``--logdir`` it first trains the vanishing-gradients example with its default settings (a few
minutes on 2 CPU cores) into a temporary folder. Then it starts a real TensorBoard on that folder (the
Rust data server, TensorBoard's default), opens its Images, Time Series and Custom Scalars dashboards in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, and ``selenium``) in a 1600x1200 window,
as a user sees them (no "Show actual image size"), and saves ``docs/tensorboard_images.png``,
``docs/tensorboard_time_series.png`` and ``docs/tensorboard_custom_scalars.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
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
    opts = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
