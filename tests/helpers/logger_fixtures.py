"""Fixtures for the real W&B (offline) and MLflow (local store) packages: every folder under the test's
``tmp_path``, no network, and no W&B service process left behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest


def _wandb_services() -> list[str]:
    """Command lines of the W&B service processes serving this test process: ``wandb-core --pid <ours>``
    (and its helpers) in wandb 0.18+, ``wandb-service(2-<ours>-...)`` before."""
    pid = os.getpid()
    if shutil.which("pgrep") is None:
        return []
    found = subprocess.run(["pgrep", "-af", "wandb"], capture_output=True, text=True, check=False).stdout
    return [
        line
        for line in found.splitlines()
        if f"wandb-service(2-{pid}-" in line or ("wandb-" in line and re.search(rf"--p?pid {pid}\b", line))
    ]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with every folder under ``tmp_path``; its service is stopped afterwards."""
    wandb = pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",  # WandbLogger(offline=True) sets it to "dryrun"; monkeypatch restores it
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_MACHINE_INFO": "true",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb-artifacts"),
    }.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wandb-dir").mkdir()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        yield wandb
    finally:
        if wandb.run is not None:
            wandb.run.finish()
        wandb.teardown()
        deadline = time.monotonic() + 10
        while _wandb_services() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _wandb_services(), "a wandb service process was left running"



@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # anything MLflow puts in the working directory lands here
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.13+ refuses file: stores otherwise
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_ASYNC_LOGGING", raising=False)
    return tmp_path


