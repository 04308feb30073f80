"""Make ``tests.helpers`` importable however pytest is launched."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers.logger_fixtures import mlflow_env, wandb_offline  # noqa: E402, F401 - fixtures
