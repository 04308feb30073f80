"""Where images, scalars and histograms go: a TensorBoard writer, or PNG files beside another logger."""

from lightning_rnnviz.sinks.base import Sink, safe_name
from lightning_rnnviz.sinks.files import FileSink
from lightning_rnnviz.sinks.tensorboard import TensorBoardSink

__all__ = ["FileSink", "Sink", "TensorBoardSink", "safe_name"]
