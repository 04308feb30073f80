"""Both Lightning namespaces: ``lightning.pytorch`` and ``pytorch_lightning`` in one process, the callback suite
under each, and ``LightningCLI`` of each from a YAML file and from command-line arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_rnnviz import RNNViz
from tests.helpers.events import RunEvents
from tests.helpers.models import loader

L = pytest.importorskip("lightning.pytorch")
import pytorch_lightning as PL  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def _env(namespace: str) -> dict[str, str]:
    # Under `pytest -n`, this process is an xdist worker; a nested run is an ordinary session, not one more
    # worker (plugins such as pytest-benchmark read PYTEST_XDIST_WORKER from the environment).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return {**inherited, "RNNVIZ_TEST_LIGHTNING": namespace, "PYTHONPATH": str(ROOT)}


def test_one_class_is_a_callback_of_both_namespaces():
    from lightning.pytorch.utilities.model_helpers import is_overridden as is_overridden_l
    from pytorch_lightning.utilities.model_helpers import is_overridden as is_overridden_pl

    cb = RNNViz()
    assert isinstance(cb, L.Callback) and isinstance(cb, PL.Callback)
    assert issubclass(RNNViz, L.Callback) and issubclass(RNNViz, PL.Callback)  # LightningCLI's check
    for namespace, is_overridden in ((L, is_overridden_l), (PL, is_overridden_pl)):
        assert is_overridden("state_dict", cb, namespace.Callback)  # its state is saved in checkpoints
        assert is_overridden("on_train_batch_end", cb, namespace.Callback)
        assert not is_overridden("on_predict_start", cb, namespace.Callback)


def test_both_namespaces_in_one_process(tmp_path):
    """One process, both Trainers, each with its own namespace's TensorBoardLogger and module class."""
    import importlib

    import torch

    for namespace in (L, PL):
        models = importlib.import_module("tests.helpers.models")
        source = Path(models.__file__).read_text().replace(
            "from tests.helpers.namespace import pl", f"import {namespace.__name__} as pl")
        scope: dict = {"__name__": f"models_{namespace.__name__.replace('.', '_')}"}
        exec(compile(source, models.__file__, "exec"), scope)  # the test models, subclassing this namespace
        torch.manual_seed(0)
        logger = namespace.loggers.TensorBoardLogger(tmp_path, name=namespace.__name__)
        trainer = namespace.Trainer(max_epochs=1, log_every_n_steps=2, logger=logger, enable_progress_bar=False,
                                    enable_model_summary=False, enable_checkpointing=False,
                                    callbacks=[RNNViz(strict=True)])
        trainer.fit(scope["TinySeqModel"](), loader(), loader(n=16))
        events = RunEvents(logger.log_dir)
        assert {"rnnviz/hidden/rnn", "rnnviz/grad_norm/rnn", "rnnviz/attention/attn"} <= set(events.Tags()["images"])
        assert [e.step for e in events.Images("rnnviz/hidden/rnn")] == [0, 1, 3]
        assert [e.step for e in events.Scalars("train_loss")] == [1, 3]


@pytest.mark.slow
def test_callback_suite_under_lightning_pytorch(request):
    """The whole callback suite (DDP, resume, precision, faults, ...) again with ``lightning.pytorch``."""
    if os.environ.get("RNNVIZ_TEST_LIGHTNING"):
        pytest.skip("already the nested run")
    warning_flags = [f"-W{flag}" for flag in request.config.getoption("pythonwarnings") or []]  # as this run's
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *warning_flags, "tests/callbacks",
         "--ignore", "tests/callbacks/test_namespaces.py"],
        cwd=ROOT, env=_env("lightning.pytorch"), capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1] and "failed" not in result.stdout.splitlines()[-1]


def _cli(namespace: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "tests/helpers/cli_run.py"), *args], cwd=cwd,
                            env=_env(namespace), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _pictures(save_dir: Path) -> dict[str, list[int]]:
    [log_dir] = sorted(p.parent for p in save_dir.rglob("hparams.yaml"))
    events = RunEvents(log_dir)
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}


@pytest.mark.slow
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightning_cli_from_yaml_and_from_the_command_line(tmp_path, namespace):
    trainer = {"max_epochs": 1, "log_every_n_steps": 50, "enable_progress_bar": False, "enable_model_summary": False,
               "enable_checkpointing": False}
    config = {"trainer": {**trainer, "logger": {"class_path": "TensorBoardLogger",
                                                "init_args": {"save_dir": str(tmp_path / "yaml")}},
                          "callbacks": [{"class_path": "lightning_rnnviz.RNNViz",
                                         "init_args": {"every_n_steps": 2, "modules": ["rnn"],
                                                       "labels": "tests.helpers.cli_run.tokens",
                                                       "scalars": "all"}}]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    _cli(namespace, tmp_path, "fit", "--config", "cfg.yaml")
    pictures = _pictures(tmp_path / "yaml")
    # 4 batches, every_n_steps=2: steps 1 and 3, and the very first step; only `rnn` is watched.
    assert pictures["rnnviz/hidden/rnn"] == [0, 1, 3] and not any("attention" in t for t in pictures)
    [log_dir] = sorted(p.parent for p in (tmp_path / "yaml").rglob("hparams.yaml"))
    assert "rnnviz/hidden/rnn/step_change/layer0" in RunEvents(log_dir).Tags()["scalars"]  # scalars="all"

    # The command-line form; --print_config writes a config that loads and runs again.
    flags = [f"--trainer.{k}={v}" for k, v in trainer.items()]
    printed = _cli(namespace, tmp_path, "fit", *flags, "--trainer.logger=TensorBoardLogger",
                   f"--trainer.logger.save_dir={tmp_path / 'cli'}", "--trainer.callbacks+=lightning_rnnviz.RNNViz",
                   "--trainer.callbacks.every_n_steps=2", "--print_config").stdout
    callbacks = yaml.safe_load(printed)["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["lightning_rnnviz.RNNViz"]
    assert callbacks[0]["init_args"]["every_n_steps"] == 2 and callbacks[0]["init_args"]["renderer"] == "fast"
    assert callbacks[0]["init_args"]["scalars"] == "default"
    (tmp_path / "printed.yaml").write_text(printed)
    _cli(namespace, tmp_path, "fit", "--config", "printed.yaml")
    pictures = _pictures(tmp_path / "cli")
    assert pictures["rnnviz/hidden/rnn"] == [0, 1, 3] and pictures["rnnviz/attention/attn"] == [0, 1, 3]
