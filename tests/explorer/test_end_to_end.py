"""The explorer from a real fit to what a person sees: ``RNNViz`` writes probe sets during a short fit, a real
TensorBoard (both loaders) finds our plugin through the installed entry point, and headless Chromium opens the
``rnnviz`` tab, whose hovered cell shows the value a ``Probe`` of the trained model records on the validation
batch; ``lightning-rnnviz explore`` turns the same run into one HTML file that shows the same from a file path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_rnnviz import Probe, RNNViz
from lightning_rnnviz.explorer.reading import read_probe_sets
from lightning_rnnviz.sinks import run_dir
from tests.explorer.test_views import choose, hover, open_page, wait
from tests.helpers.browser import chromium, require_chromium, screenshot
from tests.helpers.models import TinySeqModel
from tests.helpers.namespace import TensorBoardLogger, pl
from tests.helpers.probe_sets import write_probe_sets
from tests.helpers.tensorboard_server import TensorBoardServer, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*")]
STEPS, VAL = 6, "rnnviz/probe_set/val"


def tokens(batch, row=0):
    return [f"r{row}t{t}" for t in range(STEPS)]


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    """A short fit with the default ``RNNViz`` (probe set of 8 rows) and the Probe record of the trained model on
    the validation batch, which the last validation recorded."""
    folder = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.randn(24, STEPS, 3), torch.randn(24))
    val_x = torch.randn(8, STEPS, 3)
    val = torch.utils.data.TensorDataset(val_x, torch.randn(8))
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0,
                         callbacks=[RNNViz(strict=True, labels=tokens)], logger=TensorBoardLogger(folder, name="tb"))
    model = TinySeqModel()
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=8),
                torch.utils.data.DataLoader(val, batch_size=8))
    model.eval()
    with Probe(model, strict=True).record() as recording, torch.no_grad():
        model(val_x)
    return {"logdir": folder, "run": run_dir(trainer.loggers[0].log_dir), "record": recording["rnn"]}


def _check_hover(driver, fit, tmp_path, name):
    """The newest validation probe set, layer 1, sequence 3: hovered cells show the Probe record's values."""
    choose(driver, "rnnviz-tag", VAL)
    wait(driver, "return document.getElementById('rnnviz-step').dataset.step", "the validation steps")
    choose(driver, "rnnviz-layer", 1)
    choose(driver, "rnnviz-sequence", 3)
    canvas = driver.execute_script("return Object.assign({}, document.getElementById('rnnviz-heatmap').dataset);")
    hidden = fit["record"].hidden[1, 3].numpy()  # (T, units)
    assert (int(canvas["units"]), int(canvas["steps"])) == (hidden.shape[1], STEPS)
    # one validation per epoch; the newest shown first (the record is of the trained model)
    slider = driver.execute_script("return Object.assign({}, document.getElementById('rnnviz-step').dataset);")
    assert len(json.loads(slider["steps"])) == 2 and int(slider["step"]) == json.loads(slider["steps"])[-1]
    for unit, step in ((0, 0), (hidden.shape[1] - 1, STEPS - 1), (2, 4)):
        shown = hover(driver, unit, step)  # rows in unit order (sorted by index)
        assert (int(shown["unit"]), int(shown["step"]), shown["token"]) == (unit, step, f"r3t{step}")
        np.testing.assert_allclose(float(shown["value"]), hidden[step, unit], rtol=1e-6, atol=1e-7)
    screenshot(driver, tmp_path / f"{name}.png")


@pytest.mark.parametrize("loader", ["rust", "python"])
def test_the_tensorboard_tab_shows_a_real_fits_probe_set(fit, tmp_path, loader):
    paths = require_chromium()
    with TensorBoardServer(fit["logdir"], loader=loader) as board:
        wait_until(lambda: board.plugins_listing()["rnnviz"]["enabled"], timeout=60, until=bool,
                   what="the rnnviz tab enabled")
        # every recorded step of both tags, with the size written (the event file, read without TensorBoard)
        written, blobs = read_probe_sets(fit["logdir"])
        run = written["runs"][0]["run"]
        assert set(written["runs"][0]["tags"]) == {"rnnviz/probe_set/train", VAL}
        assert len(written["runs"][0]["tags"][VAL]["steps"]) == 2
        served = wait_until(lambda: board.get_json("/data/plugin/rnnviz/runs"), timeout=60,
                            until=lambda got: got == written, what="every probe set in /runs")
        for (name, tag, step), blob in blobs.items():
            assert board.get("/data/plugin/rnnviz/probe_set", {"run": name, "tag": tag, "step": step})[0] == blob
        assert served["runs"][0]["run"] == run
        with chromium(paths, window_size=(1600, 1200)) as driver:
            driver.get(f"{board.url}/#rnnviz")
            frame = wait_until(lambda: driver.find_elements("css selector", "iframe"), timeout=30, until=bool,
                               what="the plugin's iframe")[0]
            driver.switch_to.frame(frame)
            wait(driver, "return document.body.dataset.rnnvizReady === '1'", "the explorer's first probe set",
                 timeout=30)
            _check_hover(driver, fit, tmp_path, f"tab_{loader}")
            # a run that starts writing while the tab is open: TensorBoard's reload button reaches the iframe
            # (named to sort after the fit's run, which the tab shows first, also in the other loader's test)
            runs = "return Array.from(document.getElementById('rnnviz-run').options).map(o => o.value)"
            before = driver.execute_script(runs)
            assert before[0] == run
            write_probe_sets(fit["logdir"] / f"zz_later_{loader}", {".": {"train": [1, 2]}})
            wait_until(lambda: board.get_json("/data/plugin/rnnviz/runs")["runs"], timeout=60,
                       until=lambda got: len(got) == len(before) + 1, what="the new run served")
            driver.switch_to.default_content()
            driver.find_element("css selector", "button.reload-button").click()
            driver.switch_to.frame(frame)
            # (within 8 s: the tab itself reads the runs again only every 30 s)
            wait(driver, f"{runs.replace('return ', 'return (')}).includes('zz_later_{loader}')",
                 "the new run in the tab after TensorBoard's reload", timeout=8)


def test_the_explore_command_writes_a_page_that_shows_the_same(fit, tmp_path):
    paths = require_chromium()
    html = tmp_path / "explorer.html"
    done = subprocess.run([sys.executable, "-m", "lightning_rnnviz", "explore", str(fit["logdir"]), "-o", str(html)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with chromium(paths, window_size=(1400, 1000)) as driver:
        open_page(driver, html.as_uri())
        _check_hover(driver, fit, tmp_path, "export")
