"""lightning_rnnviz: see inside recurrent and attention models while they train."""

from lightning_rnnviz.callbacks import (
    AttentionMonitor,
    GateActivationMonitor,
    GradientNormMonitor,
    HiddenStateMonitor,
    RNNViz,
)
from lightning_rnnviz.probe import AttentionRecord, Probe, Recording, RNNRecord, RNNVizWarning

__all__ = [
    "AttentionMonitor",
    "AttentionRecord",
    "GateActivationMonitor",
    "GradientNormMonitor",
    "HiddenStateMonitor",
    "Probe",
    "RNNRecord",
    "RNNViz",
    "RNNVizWarning",
    "Recording",
]
__version__ = "0.1.0.dev0"
