"""Lightning callbacks: decide when to record and where results go. The only code importing Lightning."""

from lightning_rnnviz.callbacks.rnnviz import (
    AttentionMonitor,
    GateActivationMonitor,
    GradientNormMonitor,
    HiddenStateMonitor,
    RNNViz,
)

__all__ = ["AttentionMonitor", "GateActivationMonitor", "GradientNormMonitor", "HiddenStateMonitor", "RNNViz"]
