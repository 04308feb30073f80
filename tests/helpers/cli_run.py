"""``LightningCLI`` over ``TinySeqModel``, in the namespace of ``RNNVIZ_TEST_LIGHTNING``:
``python cli_run.py fit --config cfg.yaml``. Used by ``tests/callbacks/test_namespaces.py``."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.models import TinySeqModel, loader  # noqa: E402
from tests.helpers.namespace import NAME, pl  # noqa: E402


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()

    def val_dataloader(self):
        return loader(n=16)


def tokens(batch) -> list[str]:
    """A ``labels`` function given to the callback by its import path."""
    return [f"t{i}" for i in range(batch[0].shape[1])]


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    importlib.import_module(f"{NAME}.cli").LightningCLI(TinySeqModel, TinyData)
