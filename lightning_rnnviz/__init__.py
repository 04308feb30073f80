"""lightning_rnnviz: see inside recurrent and attention models while they train.

``Probe`` and its records need only torch; the callbacks import Lightning when first used, so that
``from lightning_rnnviz import Probe`` stays light.
"""

from typing import Any

from lightning_rnnviz.probe import AttentionRecord, Probe, Recording, RNNRecord, RNNVizWarning

_CALLBACKS = ("AttentionMonitor", "GateActivationMonitor", "GradientNormMonitor", "HiddenStateMonitor", "RNNViz")

__all__ = ["AttentionRecord", "Probe", "RNNRecord", "RNNVizWarning", "Recording", *_CALLBACKS]
__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        from lightning_rnnviz import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_rnnviz' has no attribute {name!r}")
