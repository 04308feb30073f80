"""A sink for each of a Trainer's loggers, of either Lightning namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_rnnviz.callbacks._lightning import classes
from lightning_rnnviz.sinks import FileSink, Sink, TensorBoardSink, run_dir

SUPPORTED = (
    "TensorBoardLogger (pictures, scalars, histograms, texts in TensorBoard), WandbLogger (W&B media panel "
    "and charts), MLFlowLogger (MLflow images and metrics), and any logger with a local `log_dir` or "
    "`save_dir`, e.g. CSVLogger (PNG files, scalars through the logger)"
)


def logger_kind(logger: Any) -> str:
    """``"tensorboard"``, ``"wandb"``, ``"mlflow"`` or ``"other"``."""
    for kind, name in (("tensorboard", "TensorBoardLogger"), ("wandb", "WandbLogger"), ("mlflow", "MLFlowLogger")):
        if isinstance(logger, classes(name)):
            return kind
    return "other"


def _local_dir(logger: Any) -> str | None:
    for attribute in ("log_dir", "save_dir"):
        value = getattr(logger, attribute, None)
        if value and "://" not in str(value):
            return str(value)
    return None


def sink_for(logger: Any, histograms: bool) -> Sink | None:
    """The sink that speaks ``logger``'s own API, or ``None`` when there is nowhere to write.

    A logger's own ``log_dir``, never ``trainer.log_dir``: that one is a collective, and this runs on
    global rank zero only.
    """
    kind = logger_kind(logger)
    if kind == "tensorboard":
        writer = logger.experiment  # the user's scalars are flushed with our pictures
        return TensorBoardSink(run_dir(logger.log_dir), histograms=histograms, flush_also=writer.flush)
    if kind == "wandb":
        from lightning_rnnviz.sinks.wandb import WandbSink

        return WandbSink(logger, histograms=histograms)
    if kind == "mlflow":
        from lightning_rnnviz.sinks.mlflow import MLflowSink

        return MLflowSink(logger)
    directory = _local_dir(logger)
    if directory is None:
        return None
    return FileSink(Path(directory) / "rnnviz", lambda m, s, lg=logger: lg.log_metrics(m, step=s),
                    name=type(logger).__name__)
