"""lightning_rnnviz: see inside recurrent and attention models while they train.

Public names are imported on first use: ``from lightning_rnnviz import Probe`` loads torch only, the
callbacks load Lightning, and a drawing process that imports ``lightning_rnnviz.render`` loads neither.
"""

import importlib
from typing import Any

_NAMES = {
    "AttentionRecord": "lightning_rnnviz.probe",
    "Probe": "lightning_rnnviz.probe",
    "RNNRecord": "lightning_rnnviz.probe",
    "RNNVizWarning": "lightning_rnnviz.probe",
    "Recording": "lightning_rnnviz.probe",
    "AttentionMonitor": "lightning_rnnviz.callbacks",
    "GateActivationMonitor": "lightning_rnnviz.callbacks",
    "GradientNormMonitor": "lightning_rnnviz.callbacks",
    "HiddenStateMonitor": "lightning_rnnviz.callbacks",
    "RNNViz": "lightning_rnnviz.callbacks",
    "load_records": "lightning_rnnviz.pipeline.records",
}

__all__ = sorted(_NAMES)
__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_rnnviz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
