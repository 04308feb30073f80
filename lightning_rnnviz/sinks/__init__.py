"""Where pictures, scalars, histograms and texts go: TensorBoard, PNG files beside another logger, W&B,
MLflow; one :class:`Fanout` writes to all of a Trainer's loggers."""

from lightning_rnnviz.sinks.base import Histogram, Picture, Sink, safe_name
from lightning_rnnviz.sinks.fanout import Fanout
from lightning_rnnviz.sinks.files import FileSink
from lightning_rnnviz.sinks.mlflow import MLflowSink
from lightning_rnnviz.sinks.tensorboard import TensorBoardSink, run_dir
from lightning_rnnviz.sinks.wandb import WandbSink

__all__ = [
    "Fanout", "FileSink", "Histogram", "MLflowSink", "Picture", "Sink", "TensorBoardSink", "WandbSink", "run_dir",
    "safe_name",
]
