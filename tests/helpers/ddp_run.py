"""Train ``TinySeqModel`` with ``RNNViz`` on 2 CPU processes: ``python ddp_run.py <out_dir> <strategy>``.

Used by ``tests/callbacks/test_reliability.py``. It runs as a script because Lightning's ``"ddp"``
launcher starts the other ranks by re-running ``sys.argv``; ``"ddp_spawn"`` goes through the same script
so a hang (a collective on one rank only) ends in the caller's subprocess timeout instead of hanging the
test session. Each process writes ``<out_dir>/rank<global_rank>.json`` at fit end: how many recording
blocks it opened and whether its callback was enabled.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from lightning_rnnviz import Probe, RNNViz
from tests.helpers.models import TinySeqModel, loader
from tests.helpers.namespace import Callback, TensorBoardLogger, pl

# Count recording blocks in this process: at module level so that spawned ranks (which import this file
# as ``__mp_main__``) count too, but only when run as a script (pytest imports it to look for doctests).
RECORDS = {"count": 0}
_original_record = Probe.capture


def _counting_record(self, *args, **kwargs):
    RECORDS["count"] += 1
    return _original_record(self, *args, **kwargs)


if __name__ in ("__main__", "__mp_main__"):
    Probe.capture = _counting_record


class RankReport(Callback):
    """Writes what this rank's ``RNNViz`` did (it runs after ``RNNViz`` in the callback list)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.enabled_at_start = None

    def on_train_start(self, trainer, pl_module):
        self.enabled_at_start = [cb.enabled for cb in trainer.callbacks if isinstance(cb, RNNViz)]

    def on_fit_end(self, trainer, pl_module):
        report = {"rank": trainer.global_rank, "records": RECORDS["count"], "enabled": self.enabled_at_start,
                  "world_size": trainer.world_size}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main() -> None:
    out_dir, strategy = sys.argv[1], sys.argv[2]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        log_every_n_steps=1,
        num_sanity_val_steps=1,
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(out_dir, name="tb"),
        callbacks=[RNNViz(every_n_steps=1, histograms=False), RankReport(out_dir)],
    )
    # 32 sequences, batch 8, 2 ranks: 2 batches per rank and epoch.
    trainer.fit(TinySeqModel(), loader(), loader(n=16))


if __name__ == "__main__":
    main()
