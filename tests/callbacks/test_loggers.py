"""``RNNViz`` with the loggers people use, each read back through its own package: TensorBoard, W&B (offline),
MLflow (local store), CSV, several at once, and a logger we cannot write to."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import lightning_rnnviz.pipeline.drawing as background
from lightning_rnnviz import RNNViz, RNNVizWarning
from tests.helpers.events import RunEvents
from tests.helpers.logger_readers import read_mlflow, read_wandb_offline
from tests.helpers.models import TinySeqModel, loader
from tests.helpers.namespace import CSVLogger, TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
    "ignore:The ``noload`` loader strategy is deprecated",  # MLflow's SQL store on SQLAlchemy 2.1
    "ignore:.*Experiment with name.*", "ignore:.*val_dataloader.*",
)

TRAIN_IMAGES = {"rnnviz/hidden/rnn", "rnnviz/gates/rnn", "rnnviz/grad_norm/rnn", "rnnviz/attention/attn"}
STEPS = [0, 2, 5]  # 4 batches an epoch, 2 epochs, log_every_n_steps=3, and the very first batch


def _fit(loggers, **callback) -> tuple[pl.Trainer, RNNViz]:
    torch.manual_seed(0)
    cb = RNNViz(validation=False, **callback)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=3, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, logger=loggers, callbacks=[cb])
    trainer.fit(TinySeqModel(), loader())
    return trainer, cb


@pytest.mark.slow
def test_every_logger_gets_every_picture_and_scalar_drawn_once(tmp_path, monkeypatch, wandb_offline, mlflow_env):
    """TensorBoard, W&B, MLflow and CSV on one Trainer: each shows every picture and statistic on the step of
    the user's own ``train_loss``, and each picture was drawn once."""
    drawn = []
    original = background.draw
    monkeypatch.setattr(background, "draw", lambda job: drawn.append((job.tag, job.step)) or original(job))
    loggers = pl.loggers
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tb = TensorBoardLogger(tmp_path, name="tb")
    wandb_logger = loggers.WandbLogger(offline=True, save_dir=str(wandb_dir), project="rnnviz")
    mlflow_logger = loggers.MLFlowLogger(experiment_name="rnnviz", tracking_uri=uri,
                                         artifact_location=str(tmp_path / "artifacts"))
    assert mlflow_logger.log_dir is None and mlflow_logger.save_dir is None  # no folder to write PNGs to
    csv = CSVLogger(tmp_path, name="csv")
    trainer, cb = _fit([tb, wandb_logger, mlflow_logger, csv], strict=True)
    wandb_logger.experiment.finish()
    wandb_offline.teardown()

    pictures = TRAIN_IMAGES | {"rnnviz/grad_decay/rnn"}
    assert len(drawn) == len(set(drawn)) == len(TRAIN_IMAGES) * len(STEPS) + 2  # + grad_decay at 2 epoch ends
    events = RunEvents(tb.log_dir)
    loss_steps = [e.step for e in events.Scalars("train_loss")]
    assert loss_steps == [2, 5]
    assert {t: [e.step for e in events.Images(t)] for t in TRAIN_IMAGES} == {t: STEPS for t in TRAIN_IMAGES}

    read = read_wandb_offline(wandb_dir)
    assert [s for s, _ in read["metrics"]["train_loss"]] == loss_steps
    assert {t: sorted(read["images"].get(t, {})) for t in TRAIN_IMAGES} == {t: STEPS for t in TRAIN_IMAGES}
    assert sorted(read["images"]["rnnviz/grad_decay/rnn"]) == [4, 8]
    assert [s for s, _ in read["metrics"]["rnnviz/grad_norm/rnn/log10_ratio/layer0"]] == STEPS
    assert sorted(read["histograms"]["rnnviz/hidden_dist/rnn"]) == STEPS

    from lightning_rnnviz.sinks.mlflow import MLflowSink

    stored = read_mlflow(uri, mlflow_logger.run_id)
    assert [s for s, _ in stored["metrics"]["train_loss"]] == loss_steps
    assert [s for s, _ in stored["metrics"]["rnnviz/hidden/rnn/mean_abs/layer1"]] == STEPS
    keys = MLflowSink(mlflow_logger)
    for tag in pictures:
        want = STEPS if tag in TRAIN_IMAGES else [4, 8]
        if keys.image_keys:
            assert sorted(stored["images"][keys.image_key(tag)]) == want, tag
        else:
            assert {f"{tag}/step_{s}.png" for s in want} <= set(stored["step_images"]), tag

    root = Path(csv.log_dir) / "rnnviz"
    assert sorted(p.name for p in (root / "hidden" / "rnn").iterdir()) == [f"step_{s}.png" for s in STEPS]
    assert {"rnnviz/grad_norm/rnn/first_norm/layer0"} <= set((Path(csv.log_dir) / "metrics.csv").read_text()
                                                             .splitlines()[0].split(","))
    assert not cb.error_counts


def test_mlflow_alone_with_a_file_store(tmp_path, mlflow_env):
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = pl.loggers.MLFlowLogger(experiment_name="rnnviz", tracking_uri=uri)
    assert logger.log_dir is None
    _fit(logger, strict=True, histograms=False, scalars="all")
    stored = read_mlflow(uri, logger.run_id)
    assert [s for s, _ in stored["metrics"]["rnnviz/grad_norm/rnn/decay_per_step/layer1"]] == STEPS
    assert stored["images"] or stored["step_images"]
    assert not (tmp_path / "mlruns" / "rnnviz").exists()  # no PNG-file fallback beside MLflow's own store


def test_mlflow_pictures_are_written_beside_training_its_scalars_on_the_training_thread(tmp_path, mlflow_env,
                                                                                      monkeypatch):
    """With the recording worker, MLflow's ``log_image`` (which encodes a PNG and a WebP itself: about 50 ms
    a recording on the training thread before) runs on the worker; the scalars still go through the user's
    logger on the training thread, and MLflow holds every picture and statistic as before."""
    import functools
    import threading

    from mlflow import MlflowClient

    calls = []
    log_image, log_metrics = MlflowClient.log_image, pl.loggers.MLFlowLogger.log_metrics

    @functools.wraps(log_image)  # the sink reads `key` and `step` in its signature
    def noted_image(self, *args, **kwargs):
        calls.append(("image", threading.current_thread() is threading.main_thread()))
        return log_image(self, *args, **kwargs)

    def noted_metrics(self, metrics, step=None):
        if any("rnnviz" in tag for tag in metrics):
            calls.append(("scalars", threading.current_thread() is threading.main_thread()))
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(MlflowClient, "log_image", noted_image)
    monkeypatch.setattr(pl.loggers.MLFlowLogger, "log_metrics", noted_metrics)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = pl.loggers.MLFlowLogger(experiment_name="rnnviz", tracking_uri=uri,
                                     artifact_location=str(tmp_path / "artifacts"))
    trainer, cb = _fit(logger, strict=True, histograms=False, background="thread")
    assert cb.placement == "thread" and not cb.error_counts
    assert {kind for kind, _ in calls} == {"image", "scalars"}
    assert [main for kind, main in calls if kind == "image"] == [False] * (len(TRAIN_IMAGES) * len(STEPS) + 2)
    assert all(main for kind, main in calls if kind == "scalars")
    from lightning_rnnviz.sinks.mlflow import MLflowSink

    stored, keys = read_mlflow(uri, logger.run_id), MLflowSink(logger)
    for tag in TRAIN_IMAGES:
        assert sorted(stored["images"][keys.image_key(tag)]) == STEPS, tag
    assert sorted(stored["images"][keys.image_key("rnnviz/grad_decay/rnn")]) == [4, 8]
    assert [s for s, _ in stored["metrics"]["rnnviz/hidden/rnn/mean_abs/layer1"]] == STEPS


class _Elsewhere(pl.loggers.Logger):
    """A logger with no image API we know and no local folder (a remote service, say)."""

    name, version = "elsewhere", 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((metrics, step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_logger_we_cannot_write_to_is_named_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, cb = _fit([_Elsewhere(), TensorBoardLogger(tmp_path, name="tb")])
    messages = [str(w.message) for w in caught if issubclass(w.category, RNNVizWarning)]
    assert len(messages) == 1, messages
    assert "_Elsewhere" in messages[0] and "TensorBoardLogger" in messages[0] and "WandbLogger" in messages[0]
    # the other logger still gets everything
    events = RunEvents(trainer.loggers[1].log_dir)
    assert {t: [e.step for e in events.Images(t)] for t in TRAIN_IMAGES} == {t: STEPS for t in TRAIN_IMAGES}


def test_only_a_logger_we_cannot_write_to(tmp_path):
    with pytest.warns(RNNVizWarning, match=r"cannot write to _Elsewhere: it has no image API we know"):
        trainer, cb = _fit(_Elsewhere())
    assert not cb.enabled and trainer.state.finished
