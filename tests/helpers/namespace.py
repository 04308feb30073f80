"""The Lightning namespace the callback tests run under.

``pytorch_lightning`` by default; ``RNNVIZ_TEST_LIGHTNING=lightning.pytorch`` runs the same tests against
``lightning.pytorch`` (``tests/callbacks/test_namespaces.py`` runs the callback suite that way in a
subprocess, so one ``pytest`` run covers both). Subprocesses the tests start (DDP ranks) inherit it.
"""

from __future__ import annotations

import importlib
import os

NAME = os.environ.get("RNNVIZ_TEST_LIGHTNING", "pytorch_lightning")
pl = importlib.import_module(NAME)
Callback = pl.Callback
CSVLogger = pl.loggers.CSVLogger
TensorBoardLogger = pl.loggers.TensorBoardLogger
ModelCheckpoint = pl.callbacks.ModelCheckpoint
MixedPrecision = importlib.import_module(f"{NAME}.plugins.precision").MixedPrecision
