"""Event files holding probe sets exactly as the explorer's contract writes them, without a training run.

``write_probe_sets(logdir, {"run_a": {"train": [0, 5], "val": [4]}})`` writes, in ``logdir/run_a``, one summary
per step under ``rnnviz/probe_set/train`` or ``rnnviz/probe_set/val``, the summary the TensorBoard sink writes
(:func:`lightning_rnnviz.sinks.events.blob_summary`), holding a small valid blob (:func:`probe_set_blob`, one
LSTM layer over two sequences). It returns every blob by ``(run, tag, step)``, as TensorBoard should serve
them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from lightning_rnnviz.names import PROBE_SET_TAG
from lightning_rnnviz.payload import Packer
from lightning_rnnviz.sinks.events import EventFile, blob_summary

SOURCES = {"train": "training", "val": "validation"}


def probe_set_blob(step: int, source: str = "train", *, units: int = 3, steps: int = 4, seed: int = 0) -> bytes:
    """A probe set of one single-layer LSTM over two sequences (lengths ``steps`` and ``steps - 1``), its
    values drawn from ``seed`` and ``step`` so that every blob differs."""
    rng = np.random.default_rng([seed, step, len(source)])
    packer = Packer()
    hidden = rng.standard_normal((2, steps, units)).astype(np.float32)
    hidden[1, steps - 1:] = 0.0
    gates = {name: packer.add(rng.random((2, steps, units))) for name in ("input", "forget", "cell", "output")}
    header = {
        "step": int(step), "source": SOURCES[source], "rows": [0, 1], "lengths": [steps, steps - 1],
        "steps": steps, "tokens": [[f"t{i}" for i in range(steps)], None],
        "notes": [] if source == "train" else ["no gradients: validation runs without them"],
        "modules": [{
            "type": "rnn", "name": "lstm", "kind": "LSTM", "exact": True,
            "layers": [{
                "layer": 0, "direction": 0, "label": "", "units": list(range(units)), "units_total": units,
                "hidden": packer.add(hidden), "gate_units": list(range(units)), "gates": gates,
                "grad_norm": packer.add(rng.random((2, steps))) if source == "train" else None,
                "horizon": [None, 1] if source == "train" else None,
            }],
        }],
    }
    return packer.finish(header)


def write_probe_sets(logdir: str | Path, runs: Mapping[str, Mapping[str, Iterable[int]]], *, seed: int = 0,
                     blob=probe_set_blob) -> dict[tuple[str, str, int], bytes]:
    """Write ``{run: {"train" | "val": [step, ...]}}`` under ``logdir`` (run ``"."`` is ``logdir`` itself)
    and return ``{(run, tag, step): blob}``; later writes of a (run, tag, step) replace earlier ones there."""
    written: dict[tuple[str, str, int], bytes] = {}
    for run, sources in runs.items():
        events = EventFile(Path(logdir) / run)
        try:
            for source, steps in sources.items():
                tag = f"{PROBE_SET_TAG}/{source}"
                for step in steps:
                    data = blob(step, source, seed=seed)
                    events.add_summary(blob_summary(tag, data), step)
                    written[(run, tag, int(step))] = data
        finally:
            events.close()
    return written
