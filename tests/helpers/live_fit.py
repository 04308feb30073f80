"""A training run to watch live: ``python live_fit.py <save_dir> <steps> <every_n_steps> <gate_dir> [pause ...]``.

``TinySeqModel`` with ``RNNViz`` and a ``TensorBoardLogger`` under ``save_dir`` (name ``live``), validating
every 8 steps. At the end of the training step that brings ``global_step`` to each ``pause``, the run writes
``<gate_dir>/at_<pause>`` and waits (at most 120 s) for ``<gate_dir>/go_<pause>``: a test can look at a
half-written run, in a running process, without racing it. Used by ``tests/test_tensorboard_live.py``; the
namespace follows ``RNNVIZ_TEST_LIGHTNING``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightning_rnnviz import RNNViz  # noqa: E402
from tests.helpers.models import TinySeqModel, loader  # noqa: E402
from tests.helpers.namespace import Callback, TensorBoardLogger, pl  # noqa: E402


class Gates(Callback):
    """Runs after ``RNNViz`` in the callback list: what a step recorded is on disk when it pauses."""

    def __init__(self, gate_dir: str, pauses: list[int]) -> None:
        self.gate_dir, self.pauses = Path(gate_dir), set(pauses)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.pauses:
            (self.gate_dir / f"at_{trainer.global_step}").touch()
            go = self.gate_dir / f"go_{trainer.global_step}"
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)


def main() -> None:
    save_dir, steps, every, gate_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    pauses = [int(p) for p in sys.argv[5:]]
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    trainer = pl.Trainer(max_steps=steps, log_every_n_steps=every, limit_val_batches=1, val_check_interval=8,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         logger=TensorBoardLogger(save_dir, name="live"),
                         callbacks=[RNNViz(strict=True), Gates(gate_dir, pauses)])
    trainer.fit(TinySeqModel(), loader(n=64), loader(n=16))
    print(trainer.logger.log_dir)


if __name__ == "__main__":
    main()
