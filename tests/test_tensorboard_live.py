"""What a user sees in TensorBoard itself, with both of its loaders, while a real ``fit()`` runs.

A TensorBoard server started before training (the Rust data server, TensorBoard's default, and the Python
loader of ``--load_fast=false``) must serve the user's scalars and every ``rnnviz`` image, scalar and
histogram tag while the run is going, with counts that grow, and every recorded step at the end; every
picture must decode to the size that was written; a real browser must show every picture on the Images
dashboard. The run pauses at two points (``tests/helpers/live_fit.py``), so the checks never race it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import browser
from tests.helpers.events import RunEvents
from tests.helpers.tensorboard_server import LOADERS, TensorBoardServer, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

TRAIN_IMAGES = {"rnnviz/hidden/rnn", "rnnviz/gates/rnn", "rnnviz/grad_norm/rnn", "rnnviz/attention/attn"}
VAL_IMAGES = {"rnnviz/val/hidden/rnn", "rnnviz/val/gates/rnn", "rnnviz/val/attention/attn"}
HISTOGRAMS = {"rnnviz/hidden_dist/rnn", "rnnviz/gates_dist/rnn/forget", "rnnviz/val/hidden_dist/rnn"}
# 24 steps, log_every_n_steps=4: recordings at 0 (the first batch), 3, 7, ..., 23; pauses after 8 and 16.
RECORDED = {8: [0, 3, 7], 16: [0, 3, 7, 11, 15], 24: [0, 3, 7, 11, 15, 19, 23]}
OURS, USERS = "live/version_0/rnnviz", "live/version_0"


def _counts(board: TensorBoardServer) -> dict[str, int]:
    """How many steps the server holds for each image tag of our run, and for the user's ``train_loss``."""
    counts = {tag: len(board.images(OURS, tag, sizes=False)) for tag in board.tags("images").get(OURS, {})}
    if "train_loss" in board.tags("scalars").get(USERS, {}):
        counts["train_loss"] = len(board.scalars(USERS, "train_loss"))
    return counts


@pytest.mark.parametrize("loader", LOADERS)
def test_tensorboard_shows_every_picture_live_and_at_the_end(tmp_path, loader):
    logdir, gates = tmp_path / "logs", tmp_path / "gates"
    logdir.mkdir()
    gates.mkdir()
    with TensorBoardServer(logdir, loader=loader) as board:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        run = subprocess.Popen([sys.executable, str(ROOT / "tests/helpers/live_fit.py"), str(logdir), "24", "4",
                                str(gates), "8", "16"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            seen = {}
            for pause in (8, 16):
                wait_until(lambda p=pause: (gates / f"at_{p}").exists() or run.poll() is not None, 120,
                           what=f"the run to reach step {pause}")
                assert run.poll() is None, run.stdout.read().decode()[-3000:]
                # Lightning writes a step's `train_loss` after the callbacks' batch end: 3, 7, ... before the pause.
                want = {tag: len(RECORDED[pause]) for tag in TRAIN_IMAGES} | {"train_loss": (pause - 1) // 4}
                seen[pause] = wait_until(lambda: _counts(board), 30,
                                         until=lambda c, w=want: {k: c.get(k) for k in w} == w,
                                         what=f"at step {pause}, while training: {want}")
                histograms = board.tags("histograms").get(OURS, {})
                assert HISTOGRAMS - {"rnnviz/val/hidden_dist/rnn"} <= set(histograms)
                assert len(board.histograms(OURS, "rnnviz/hidden_dist/rnn")) == len(RECORDED[pause])
                scalars = board.tags("scalars").get(OURS, {})
                assert {"rnnviz/grad_norm/rnn/log10_ratio/layer0", "rnnviz/hidden/rnn/mean_abs/layer0"} <= set(scalars)
                assert not [t for t in scalars if t.startswith("rnnviz/overhead/")]  # only with scalars="all"
                (gates / f"go_{pause}").touch()
            assert all(seen[16][tag] > seen[8][tag] for tag in seen[8])  # it grew while training
            assert run.wait(120) == 0, run.stdout.read().decode()[-3000:]
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
            run.stdout.close()

        # After the run: every recorded step of every tag, each picture the size that was written.
        written = RunEvents(logdir / USERS)
        everything = TRAIN_IMAGES | VAL_IMAGES | {"rnnviz/grad_decay/rnn"}
        wait_until(lambda: set(board.tags("images").get(OURS, {})), 30, until=lambda t: t == everything,
                   what="every image tag")
        for tag in everything:
            steps = [e.step for e in written.Images(tag)]
            entries = wait_until(lambda t=tag: board.images(OURS, t), 30, until=lambda e, n=len(steps): len(e) == n,
                                 what=f"every step of {tag}")
            assert [e.step for e in entries] == steps
            for entry, event in zip(entries, written.Images(tag)):
                assert board.fetch_image(entry).size == (event.width, event.height)
        assert [e.step for e in written.Images("rnnviz/hidden/rnn")] == RECORDED[24]
        assert set(board.tags("histograms")[OURS]) >= HISTOGRAMS
        # The findings' table of each epoch (8 steps an epoch), in the Text dashboard.
        texts = wait_until(lambda: board.text(OURS, "rnnviz/findings"), 30, until=lambda t: len(t) == 3,
                           what="three findings tables")
        assert [t.step for t in texts] == [8, 16, 24] and texts[0].plain.startswith("Epoch 0 (step 8)")
        assert "<table>" in texts[-1].html or "no findings" in texts[-1].plain
        layout = board.custom_scalars_layout()
        titles = {category["title"] for category in layout["category"]}
        assert {"rnnviz: rnn", "rnnviz: attn", "rnnviz: every module"} <= titles

        paths = browser.require_chromium()
        with browser.chromium(paths) as driver:
            cards = browser.image_cards(driver, board, tag_filter="rnnviz/", expect=len(everything))
            assert {c.tag for c in cards} == everything and all(c.loaded and c.natural_width > 0 for c in cards)
            assert browser.screenshot(driver, tmp_path / f"images-{loader}.png")[0] > 0
            charts = browser.custom_scalar_charts(driver, board)
            assert {c.category for c in charts} >= {"rnnviz: rnn", "rnnviz: attn"}
            assert all(c.lines > 0 for c in charts if c.category == "rnnviz: rnn")
            browser.screenshot(driver, tmp_path / f"custom-scalars-{loader}.png")
            [card] = browser.text_cards(driver, board, expect=1)
            assert card.tag == "rnnviz/findings" and card.run == OURS
            assert any(entry.tables for entry in card.entries) or "no findings" in card.entries[0].text
            browser.screenshot(driver, tmp_path / f"text-{loader}.png")
