"""lightning_rnnviz: see inside recurrent and attention models while they train."""

from lightning_rnnviz.probe import AttentionRecord, Probe, Recording, RNNRecord, RNNVizWarning

__all__ = ["AttentionRecord", "Probe", "RNNRecord", "RNNVizWarning", "Recording"]
__version__ = "0.1.0.dev0"
