"""The W&B and MLflow sinks with real Lightning Trainers of both namespaces, read back as a user sees them.

A tiny module logs ``train_loss`` every step with ``log_every_n_steps=2``; a callback drives the sink on
the steps Lightning logs at. Lightning logs a training step's metrics after ``on_train_batch_end``, at
``step = fit_loop.epoch_loop._batches_that_stepped`` (incremented only after that), and only when
``(step + 1) % log_every_n_steps == 0``: steps 1, 3, 5, 7 here. ``trainer.global_step`` is already
``step + 1`` in ``on_train_batch_end`` (the optimizer has stepped), so it is not the value to use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lightning_rnnviz.sinks import Histogram, Picture
from lightning_rnnviz.sinks.png import encode_png
from tests.helpers.logger_readers import parse_mlflow_image_name, read_mlflow, read_wandb_offline

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # "lightning.pytorch" without "lightning"
        return False


needs_wandb = pytest.mark.skipif(not _installed("wandb"), reason="wandb is not installed")
needs_mlflow = pytest.mark.skipif(not _installed("mlflow"), reason="mlflow is not installed")
namespaces = pytest.mark.parametrize(
    "namespace",
    [
        pytest.param(ns, marks=pytest.mark.skipif(not _installed(ns), reason=f"{ns} is not installed"))
        for ns in NAMESPACES
    ],
)

pytestmark = [
    # MLflow's SQL store uses a SQLAlchemy loader option that SQLAlchemy 2.1 deprecates: not ours to fix
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
    # MLflow 3.10-3.12 on a file: store (3.13+ refuses one unless MLFLOW_ALLOW_FILE_STORE is set)
    pytest.mark.filterwarnings("ignore:The filesystem tracking backend:FutureWarning"),
]

TAGS = ("rnnviz/hidden/rnn", "rnnviz/gates/rnn.l0")
HISTOGRAM = "rnnviz/hidden_dist/rnn"
SCALAR = "rnnviz/hidden/rnn/mean_abs"
FINDINGS = "rnnviz/findings"


def make_picture(step: int, index: int = 0, height: int = 24, width: int = 40) -> Picture:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = (step * 20) % 256
    rgb[..., 1] = np.arange(width, dtype=np.uint8)[None, :] * 3
    rgb[: index + 1, :, 2] = 255
    return Picture(encode_png(rgb), width, height)


def make_histogram(step: int) -> Histogram:
    values = np.random.default_rng(step).normal(size=200)
    counts, edges = np.histogram(values, bins=16)
    return Histogram(
        float(values.min()),
        float(values.max()),
        float(values.size),
        float(values.sum()),
        float(values @ values),
        edges[1:],
        counts,
    )


def findings(step: int) -> str:
    table = f"| module | finding |\n|---|---|\n| `rnn` | **saturated** gates: {step} |\n"
    return f"# Findings at step {step}\n\n{table}"


# --- Lightning -----------------------------------------------------------------------------------
def lightning_parts(namespace: str):
    pl = importlib.import_module(namespace)
    import torch

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(
                torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
            )
            return torch.utils.data.DataLoader(data, batch_size=2)

    class Driver(pl.Callback):
        """Drives the sink with a step's worth of synthetic output on the steps Lightning logs at."""

        def __init__(self, sink) -> None:
            self.sink = sink
            self.steps: list[int] = []
            self.expected: dict[int, dict] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            assert trainer.global_step == step + 1  # not the step Lightning's loggers get
            if (step + 1) % trainer.log_every_n_steps:
                return
            pictures = [make_picture(step, i) for i in range(len(TAGS))]
            for tag, picture in zip(TAGS, pictures):
                self.sink.image(tag, picture, step)
            self.sink.scalars({SCALAR: 0.5 + step}, step)
            if self.sink.wants_histograms:
                self.sink.histogram(HISTOGRAM, make_histogram(step), step)
            self.sink.text(FINDINGS, findings(step), step)
            self.sink.flush()
            self.steps.append(step)
            self.expected[step] = {"pictures": pictures}

        def on_train_end(self, trainer, pl_module):
            self.sink.close()

    return pl, Tiny, Driver


def fit(namespace: str, logger, make_sink) -> tuple:
    pl, Tiny, Driver = lightning_parts(namespace)
    sink = make_sink(logger)
    driver = Driver(sink)
    trainer = pl.Trainer(
        max_epochs=1,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[driver],
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=logger.save_dir or os.getcwd(),
    )
    trainer.fit(Tiny())
    return sink, driver


# --- W&B -----------------------------------------------------------------------------------------
@needs_wandb
@namespaces
def test_wandb_sink_lines_up_with_the_users_scalars(namespace, tmp_path, monkeypatch, wandb_offline):
    from lightning_rnnviz.sinks.wandb import WandbSink

    loggers = importlib.import_module(f"{namespace}.loggers")
    save_dir = tmp_path / "runs"
    save_dir.mkdir()
    logger = loggers.WandbLogger(offline=True, save_dir=str(save_dir), project="rnnviz-test")
    assert logger.save_dir == str(save_dir) and logger.log_dir is None
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    _, driver = fit(namespace, logger, WandbSink)
    logger.experiment.finish()
    wandb_offline.teardown()  # finish() can return before the service has written the run's last records

    read = read_wandb_offline(save_dir)
    assert read["exited"]
    assert read["step_metrics"].get("*") == "trainer/global_step"
    user_steps = [step for step, _ in read["metrics"]["train_loss"]]
    assert user_steps == [1, 3, 5, 7] == driver.steps

    for index, tag in enumerate(TAGS):
        assert sorted(read["images"][tag]) == user_steps
        for step in user_steps:
            (path,) = read["images"][tag][step]
            # our PNG went in unchanged (no re-encoding), and W&B named it <key>_<its own _step>_<hash>.png
            assert path.read_bytes() == driver.expected[step]["pictures"][index].png
            relative = path.relative_to(read["files_dir"] / "media" / "images").as_posix()
            assert read["image_files"][relative] == (tag, read["image_rows"][tag][step][0])
    assert [step for step, _ in read["metrics"][SCALAR]] == user_steps
    assert [value for _, value in read["metrics"][SCALAR]] == [0.5 + s for s in user_steps]
    assert sorted(read["histograms"]) == [HISTOGRAM]  # its picture has the plain tag
    assert sorted(read["histograms"][HISTOGRAM]) == user_steps
    for step, hist in read["histograms"][HISTOGRAM].items():
        assert hist["values"] == make_histogram(step).counts.tolist() and len(hist["bins"]) == 17
    assert sorted(read["html"][FINDINGS]) == user_steps
    assert "<table>" in read["html"][FINDINGS][3] and "<b>saturated</b> gates: 3" in read["html"][FINDINGS][3]

    # one row per recording step holds all of it, beside (not merged into) the user's row of that step
    ours = [row for row in read["rows"] if TAGS[0] in row]
    assert [row["trainer/global_step"] for row in ours] == user_steps
    assert all(set(TAGS) | {SCALAR, FINDINGS, HISTOGRAM} <= set(row) for row in ours)
    steps = [row["_step"] for row in read["rows"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)

    assert not list(tmp.glob("rnnviz-*"))  # the sink's temporary PNGs and folder are gone


@needs_wandb
def test_wandb_sink_buffers_a_step_and_flushes_when_the_step_changes():
    from lightning_rnnviz.sinks.wandb import WandbSink

    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, dict(metrics))))
    sink = WandbSink(logger)
    sink.scalars({"a": 1}, 3)
    sink.text(FINDINGS, "hello", 3)
    assert logged == []
    sink.scalars({"a": 2}, 5)  # another step: step 3 goes out first
    assert [(step, sorted(row)) for step, row in logged] == [(3, ["a", FINDINGS])]
    sink.flush()
    sink.flush()  # nothing waiting: nothing sent
    assert [step for step, _ in logged] == [3, 5] and logged[1][1] == {"a": 2.0}
    sink.close()


@needs_wandb
def test_wandb_sink_hands_over_the_array_where_the_run_links_media():
    from lightning_rnnviz.sinks.wandb import WandbSink

    given = []
    fake_wandb = SimpleNamespace(Image=lambda data: given.append(data) or "image")
    for symlink in (False, True):
        run = SimpleNamespace(settings=SimpleNamespace(allow_media_symlink=symlink))
        sink = WandbSink(SimpleNamespace(experiment=run, log_metrics=lambda metrics, step: None))
        sink._wandb = fake_wandb
        picture = make_picture(1)
        sink.image("rnnviz/hidden/rnn", picture, 1)
        sink.flush()
        sink.close()
    path, array = given
    assert isinstance(path, str) and path.endswith(".png") and not os.path.exists(path)
    assert isinstance(array, np.ndarray) and np.array_equal(array, picture.rgb())


def test_histogram_edges_merge_past_wandbs_bin_limit():
    from lightning_rnnviz.sinks.wandb import histogram_edges

    values = np.random.default_rng(0).normal(size=5000)
    counts, edges = np.histogram(values, bins=1000)
    hist = Histogram(float(values.min()), float(values.max()), 5000.0, 0.0, 0.0, edges[1:], counts)
    merged, merged_edges = histogram_edges(hist)
    assert len(merged) <= 512 and len(merged_edges) == len(merged) + 1
    assert merged.sum() == 5000 and merged_edges[0] == values.min() and merged_edges[-1] == values.max()
    assert np.all(np.diff(merged_edges) >= 0)
    open_ended = Histogram(0.0, 2.0, 3.0, 0.0, 0.0, np.array([1.0, np.inf]), np.array([1, 2]))
    assert histogram_edges(open_ended)[1].tolist() == [0.0, 1.0, 2.0]


# --- MLflow --------------------------------------------------------------------------------------
@needs_mlflow
@namespaces
@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_sink_lines_up_with_the_users_scalars(namespace, store, mlflow_env):
    from mlflow import MlflowClient

    from lightning_rnnviz.sinks.mlflow import MLflowSink, has_image_keys, slashes_survive_image_keys

    tmp_path = mlflow_env
    loggers = importlib.import_module(f"{namespace}.loggers")
    if store == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        logger = loggers.MLFlowLogger(
            experiment_name="rnnviz", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts")
        )
        assert logger.save_dir is None
    else:
        uri = f"file:{tmp_path / 'mlruns'}"
        logger = loggers.MLFlowLogger(experiment_name="rnnviz", tracking_uri=uri)
        assert logger.save_dir == str(tmp_path / "mlruns")
    assert logger.log_dir is None

    sink, driver = fit(namespace, logger, MLflowSink)
    assert sink.image_keys == has_image_keys(MlflowClient)
    read = read_mlflow(uri, logger.run_id)

    user_steps = [step for step, _ in read["metrics"]["train_loss"]]
    assert user_steps == [1, 3, 5, 7] == driver.steps
    assert read["metrics"][SCALAR] == [(s, 0.5 + s) for s in user_steps]  # "/" kept in metric names
    for index, tag in enumerate(TAGS):
        if not sink.image_keys:  # MLflow < 2.12: our PNG files as artifacts
            for step in user_steps:
                with open(read["step_images"][f"{tag}/step_{step}.png"], "rb") as file:
                    assert file.read() == driver.expected[step]["pictures"][index].png
            continue
        key = sink.image_key(tag)  # the tag itself where MLflow keeps "/" ("~" in the file name)
        assert key == tag or not slashes_survive_image_keys()
        assert sorted(read["images"][key]) == user_steps
        assert sorted(read["thumbnails"][key]) == user_steps
        for step, path in read["images"][key].items():  # MLflow re-encodes, losslessly
            expected = driver.expected[step]["pictures"][index].rgb()
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
    if sink.image_keys:
        assert read["tags"].get("mlflow.loggedImages") == "True"
    assert sorted(read["text"]) == [f"{FINDINGS}/step_{s}.md" for s in user_steps]
    assert read["text"][f"{FINDINGS}/step_5.md"] == findings(5)
    assert not any(key.startswith("rnnviz/hidden") and "hist" in key for key in read["artifacts"])
    assert sink._tmpdir is None


@needs_mlflow
def test_mlflow_sink_keeps_our_png_where_log_image_has_no_key(mlflow_env):
    from mlflow import MlflowClient

    from lightning_rnnviz.sinks.mlflow import MLflowSink, has_image_keys

    class OldClient:  # MLflow before 2.12
        def log_image(self, run_id, image, artifact_file): ...

    import mlflow

    assert not has_image_keys(OldClient())
    version = tuple(int(part) for part in mlflow.__version__.split(".")[:2])
    assert has_image_keys(MlflowClient) == (version >= (2, 12))

    uri = f"sqlite:///{mlflow_env / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("old", artifact_location=str(mlflow_env / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    sent = []
    logger = SimpleNamespace(
        experiment=client, run_id=run_id, log_metrics=lambda m, step: sent.append((step, m))
    )
    sink = MLflowSink(logger, image_keys=False)
    pictures = {step: make_picture(step) for step in (2, 4)}
    for step, picture in pictures.items():
        sink.image("rnnviz/hidden/rnn", picture, step)
        sink.scalars({SCALAR: step}, step)
    sink.close()
    assert sent == [(2, {SCALAR: 2.0}), (4, {SCALAR: 4.0})]
    read = read_mlflow(uri, run_id)
    assert sorted(read["step_images"]) == ["rnnviz/hidden/rnn/step_2.png", "rnnviz/hidden/rnn/step_4.png"]
    for step, picture in pictures.items():
        with open(read["step_images"][f"rnnviz/hidden/rnn/step_{step}.png"], "rb") as file:
            assert file.read() == picture.png  # our bytes, not re-encoded
    assert read["images"] == {}


def test_mlflow_image_names_of_both_generations():
    new = parse_mlflow_image_name(
        "rnnviz~hidden~rnn.l0+step+7+timestamp+1700000000000+0f1e2d3c-aaaa-bbbb-cccc-000000000000.png"
    )
    old = parse_mlflow_image_name(
        "rnnviz#hidden#rnn%step%3%timestamp%1700000000000%0f1e2d3c-aaaa-bbbb-cccc-000000000000%compressed.webp"
    )
    assert (new["key"], new["step"], new["compressed"]) == ("rnnviz/hidden/rnn.l0", 7, False)
    assert (old["key"], old["step"], old["compressed"]) == ("rnnviz/hidden/rnn", 3, True)
    assert parse_mlflow_image_name("rnnviz/findings/step_3.md") is None
