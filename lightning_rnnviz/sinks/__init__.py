"""Where pictures, scalars, histograms and texts go, one adapter per logger API: TensorBoard, PNG files beside
another logger, W&B, MLflow. A sink takes what was drawn and encoded already (:class:`Picture`) and speaks
its logger's API; nothing here draws, reduces or knows a record."""

from lightning_rnnviz.sinks.base import Histogram, Picture, Sink, safe_name
from lightning_rnnviz.sinks.files import FileSink
from lightning_rnnviz.sinks.mlflow import MLflowSink
from lightning_rnnviz.sinks.tensorboard import TensorBoardSink, run_dir
from lightning_rnnviz.sinks.wandb import WandbSink

__all__ = [
    "FileSink", "Histogram", "MLflowSink", "Picture", "Sink", "TensorBoardSink", "WandbSink", "run_dir", "safe_name",
]
