"""After training, from the run directories alone: ``save_records`` read back with ``load_records``, and the
``summary`` / ``compare`` commands on real runs of three models written by the test."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_rnnviz import RNNViz, RNNVizWarning, load_records
from lightning_rnnviz.render.jobs import draw
from tests.helpers.models import OneRNNModel, TinySeqModel, loader
from tests.helpers.namespace import TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
    "ignore:.*val_dataloader.*",
)
ROOT = Path(__file__).resolve().parents[2]


def _fit(tmp_path: Path, model: pl.LightningModule, name: str = "tb", **callback) -> pl.Trainer:
    torch.manual_seed(0)
    cb = RNNViz(every_n_steps=2, histograms=False, strict=True, **callback)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=2, logger=TensorBoardLogger(tmp_path, name=name),
                         callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, loader(), loader(n=16))
    return trainer


def test_saved_records_come_back_as_arrays_and_draw_the_same_picture(tmp_path):
    trainer = _fit(tmp_path, TinySeqModel(), save_records=True)
    steps = load_records(trainer.logger.log_dir)  # the logger's run; our data sit in its rnnviz/ folder
    assert [s.step for s in steps] == [0, 1, 3, 4, 5, 7, 8]  # training recordings, validation, epoch ends
    first = steps[0]
    assert {"rnnviz/hidden/rnn", "rnnviz/gates/rnn", "rnnviz/grad_norm/rnn", "rnnviz/attention/attn"} <= set(first.payloads)
    assert isinstance(first.payloads["rnnviz/hidden/rnn"]["values"], np.ndarray) and not first.records
    assert np.isfinite(first.stats["rnnviz/grad_norm/rnn/horizon/layer1"])
    assert "rnnviz/grad_decay/rnn" in next(s for s in steps if s.step == 4).payloads
    assert "rnnviz/val/hidden/rnn" in next(s for s in steps if s.step == 3).payloads
    # What was drawn can be drawn again from the file, pixel for pixel.
    original = [e for e in _images(trainer, "rnnviz/hidden/rnn") if e[0] == 0][0][1]
    np.testing.assert_array_equal(draw(first.job("rnnviz/hidden/rnn", renderer="fast")), original)


def _images(trainer, tag):
    from tests.helpers.events import RunEvents

    events = RunEvents(trainer.logger.log_dir)
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
            for e in events.Images(tag)]


@pytest.mark.parametrize("background", [False, "thread"])  # the training thread, or the recording worker
def test_full_records_and_their_bound(tmp_path, background):
    trainer = _fit(tmp_path / "full", TinySeqModel(), save_records="full", background=background)
    step = load_records(trainer.logger.log_dir)[0]
    record = step.records["rnnviz/rnn"]
    assert record["hidden"].shape == (2, 8, 6, 8) and record["hidden_grad"].dtype == np.float32
    assert step.to_record("rnnviz/rnn").hidden.shape == (2, 8, 6, 8)
    with pytest.warns(RNNVizWarning, match=r"save_records_max_mb"):
        trainer = _fit(tmp_path / "bound", TinySeqModel(), save_records="full", save_records_max_mb=0.08,
                       background=background)
    assert [s.step for s in load_records(trainer.logger.log_dir)] == [0, 1]  # about 31 kB each; then the bound


# --- the command line on three real runs ---------------------------------------------------------
@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for kind in ("RNN", "GRU", "LSTM"):
        torch.manual_seed(0)
        cb = RNNViz(every_n_steps=1, histograms=False, validation=False, strict=True)
        trainer = pl.Trainer(max_epochs=2, log_every_n_steps=1, logger=TensorBoardLogger(root, name=kind.lower()),
                             callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        x = torch.randn(16, 20, 3, generator=torch.Generator().manual_seed(1))
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :, 0].mean(1)), batch_size=8)
        trainer.fit(OneRNNModel(kind), data)
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_rnnviz", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_summary_of_a_real_run(three_runs):
    done = _cli("summary", str(three_runs / "lstm" / "version_0"))
    assert done.returncode == 0, done.stderr
    assert "rnn (LSTM; 1 row)" in done.stdout and "horizon" in done.stdout and "decay/step" in done.stdout
    assert "forget mean" in done.stdout  # the LSTM's gate means
    assert "findings" in done.stdout


def test_compare_three_real_runs(three_runs, tmp_path):
    runs = [str(three_runs / kind / "version_0") for kind in ("rnn", "gru", "lstm")]
    out = tmp_path / "compare.png"
    done = _cli("compare", *runs, "--out", str(out))
    assert done.returncode == 0, done.stderr
    for label in ("rnn", "gru", "lstm"):
        assert label in done.stdout
    with Image.open(out) as image:
        width, height = image.size
        assert image.format == "PNG" and 600 <= width <= 3000 and 300 <= height <= 3000
    for suffix in ("svg", "pdf"):
        assert _cli("compare", *runs, "--epoch", "0", "--out", str(tmp_path / f"c.{suffix}")).returncode == 0
        assert (tmp_path / f"c.{suffix}").stat().st_size > 1000


@pytest.mark.parametrize(("args", "message"), [
    (["summary", "{tmp}/nothing-here"], "no such file or folder"),
    (["summary", "{tmp}"], "is not a lightning_rnnviz run"),
    (["compare", "{runs}/rnn/version_0", "--module", "decoder", "--out", "{tmp}/x.png"], "'rnn'"),
    (["compare", "{runs}/rnn/version_0", "--out", "{tmp}/x.gif"], "gif"),
])
def test_clear_errors(three_runs, tmp_path, args, message):
    done = _cli(*(a.format(tmp=tmp_path, runs=three_runs) for a in args))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr
