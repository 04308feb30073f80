"""Capture (torch only): hooks, replay of fused RNNs, attention recomputation and the records they fill."""

from lightning_rnnviz.probe.probe import Capture, Probe, RNNVizWarning
from lightning_rnnviz.probe.records import AttentionRecord, Recording, RNNRecord
from lightning_rnnviz.probe.targets import SUPPORTED_TYPES

__all__ = ["AttentionRecord", "Capture", "Probe", "RNNRecord", "RNNVizWarning", "Recording", "SUPPORTED_TYPES"]
