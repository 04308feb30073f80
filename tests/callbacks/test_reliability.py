"""Reliability (issue 5): real training setups, faults and bad input, each run for real on CPU.

Every Lightning test here trains a tiny model for a few steps and reads the TensorBoard event files back.
Numbers are compared across setups with ``lr=0`` (weights never move, so the same batch must give the
same recorded gradients whatever the precision, compilation or checkpointing). Gradient accumulation
is covered in ``test_rnnviz.py``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn

from lightning_rnnviz import GradientNormMonitor, Probe, RNNViz, RNNVizWarning, render
from tests.helpers.events import RunEvents
from tests.helpers.models import (
    ConfigureModelSeqModel,
    InterruptModel,
    ManualTwoOptimizerModel,
    NoValidationStepModel,
    PackedBiLSTMModel,
    ProjectedSeqModel,
    TinySeqModel,
    TwoValLoadersModel,
    VanillaRNNModel,
    loader,
    padded_loader,
)
from tests.helpers.namespace import (
    Callback,
    CSVLogger,
    MixedPrecision,
    ModelCheckpoint,
    TensorBoardLogger,
    pl,
)

pytestmark = pytest.mark.filterwarnings(
    # Lightning's own remarks about tiny test runs, none of them ours.
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*Checkpoint directory.*",
    "ignore:.*log_every_n_steps.*", "ignore:.*dirpath has changed.*", "ignore:.*sync_dist=True.*",
    "ignore:.*no `val_dataloader`.*",
)

ROOT = Path(__file__).resolve().parents[2]
RNN_IMAGES = {"rnnviz/hidden/rnn", "rnnviz/gates/rnn", "rnnviz/grad_norm/rnn"}
TRAIN_IMAGES = RNN_IMAGES | {"rnnviz/attention/attn"}
GRAD_STATS = ("first_norm", "last_norm", "log10_ratio", "decay_per_step")


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads. On a 2-core machine that other processes share,
    two OpenMP threads make the LSTM kernels (the user's and the replay's alike) 10-20 times slower
    (T=1500 fit: 8 s with 1 thread, 170 s with 2, without the callback), which would only measure the
    machine's load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers -----------------------------------------------------------------------------------------
def _trainer(tmp_path: Path, callbacks, logger="tb", **kwargs) -> pl.Trainer:
    if logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="tb")
    elif logger == "csv":
        logger = CSVLogger(tmp_path, name="csv")
    defaults = {
        "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "logger": logger, "callbacks": callbacks,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _events(log_dir: str | Path) -> RunEvents:
    return RunEvents(log_dir)


def _image_steps(acc: RunEvents) -> dict[str, list[int]]:
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def _scalars(acc: RunEvents, prefix: str = "rnnviz/") -> dict[str, list[tuple[int, float]]]:
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(prefix)]
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}


def _assert_each_image_once_per_step(steps: dict[str, list[int]]) -> None:
    for tag, values in steps.items():
        assert len(values) == len(set(values)), f"{tag} written twice on one step: {values}"


def _child_pids() -> set[int]:
    """Live or unreaped (zombie) child processes of this process, from /proc (not only multiprocessing's)."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.add(int(entry))
    return found


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def _new_threads(before: set[int], grace_s: float = 10.0) -> list[str]:
    """Threads started since ``before`` that are still alive after a grace period for them to finish."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return [t.name for t in alive]
        time.sleep(0.1)


@contextlib.contextmanager
def _all_warnings():
    """Record every warning (also repeats) instead of turning it into an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _rnnviz_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RNNVizWarning)]


def _kind(message: str) -> str:
    """The part of an RNNViz warning that names what failed, without the varying error detail."""
    return message.split(" (", 1)[0]


# --- distributed ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_two_cpu_processes_write_each_image_once_from_rank_zero(tmp_path, strategy):
    """2 CPU processes (gloo). ``ddp`` re-runs the script for rank 1, ``ddp_spawn`` pickles the trainer
    (and so the callback) into spawned processes; a collective on one rank only would hang until the
    timeout."""
    script = ROOT / "tests" / "helpers" / "ddp_run.py"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script), str(tmp_path), strategy], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240, check=False)
    print(f"{strategy}: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = {r["rank"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json"))}
    assert sorted(reports) == [0, 1] and reports[0]["world_size"] == 2
    assert reports[0]["enabled"] == [True] and reports[0]["records"] > 0
    assert reports[1]["enabled"] == [False] and reports[1]["records"] == 0, "rank 1 recorded"

    run_dirs = list((tmp_path / "tb").iterdir())
    assert len(run_dirs) == 1, f"more than one run directory: {run_dirs}"
    event_files = sorted(p.name for p in run_dirs[0].glob("events.out.tfevents.*"))
    acc = _events(run_dirs[0])
    steps = _image_steps(acc)
    _assert_each_image_once_per_step(steps)
    # 32 sequences, batch 8, 2 ranks: 2 steps an epoch, 2 epochs; validation once a run, on the step of
    # its scalars; the gradient-decay picture at each epoch end.
    for tag in TRAIN_IMAGES:
        assert steps[tag] == [0, 1, 2, 3], tag
    assert {e.step for e in acc.Scalars("train_loss")} <= {0, 1, 2, 3}
    val_steps = [e.step for e in acc.Scalars("val_loss")]
    assert len(val_steps) == 2
    for tag in ("rnnviz/val/hidden/rnn", "rnnviz/val/attention/attn"):
        assert steps[tag] == val_steps, tag
    assert steps["rnnviz/grad_decay/rnn"] == [2, 4]
    assert len(event_files) <= 2, event_files  # the logger's and the drawing process's, no rank 1 file
    for tag, values in _scalars(acc).items():
        assert len(values) == len({s for s, _ in values}), f"{tag} written twice on one step"
        assert all(math.isfinite(v) for _, v in values if "overhead" not in tag), tag


# --- precision --------------------------------------------------------------------------------------
def _grad_stats_run(tmp_path: Path, model: pl.LightningModule, **trainer_kwargs) -> dict[str, list[float]]:
    """Train ``model`` (lr=0) for 2 steps with a ``GradientNormMonitor``: its grad_norm statistics per step.

    Watches the RNN only (attention under autocast: ``test_probe_records_attention_under_bf16_autocast``).
    """
    cb = GradientNormMonitor(every_n_steps=1, modules=["rnn*"], validation=False, histograms=False,
                             strict=True, scalars="all")
    trainer = _trainer(tmp_path, [cb], **trainer_kwargs)
    trainer.fit(model, loader())
    assert trainer.state.finished
    acc = _events(trainer.logger.log_dir)
    steps = _image_steps(acc)
    assert [t for t in steps if t.startswith("rnnviz/grad_norm/")], steps
    scalars = _scalars(acc, "rnnviz/grad_norm/")
    return {t.split("/", 2)[2]: [v for _, v in values] for t, values in scalars.items()}


@pytest.fixture(scope="module")
def fp32_rnn_stats(tmp_path_factory) -> dict[str, list[float]]:
    torch.manual_seed(0)
    return _grad_stats_run(tmp_path_factory.mktemp("fp32"), VanillaRNNModel(lr=0.0))


def _assert_close_stats(got: dict[str, list[float]], want: dict[str, list[float]], rel: float) -> None:
    assert set(got) == set(want)
    for tag, values in want.items():
        for g, w in zip(got[tag], values, strict=True):
            if "log10_ratio" in tag or "decay_per_step" in tag:
                assert g == pytest.approx(w, abs=rel * 10), tag  # log10 of a ratio: compare absolutely
            else:
                assert g == pytest.approx(w, rel=rel), tag


def test_probe_under_bf16_autocast_records_float32():
    torch.manual_seed(0)
    rnn = nn.RNN(3, 8, num_layers=2, batch_first=True)
    x = torch.randn(4, 6, 3)
    with Probe(rnn, strict=True).record() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        h, _ = rnn(x)
        assert h.dtype == torch.bfloat16  # really running in reduced precision
        h.float().pow(2).mean().backward()
    r = rec[""]
    for t in (r.hidden, r.hidden_grad):
        assert t.dtype == torch.float32 and bool(t.isfinite().all())
    # The float32 replay agrees with the bf16 forward to bf16 precision.
    assert torch.allclose(r.hidden[-1], h.float(), atol=3e-2)


def test_probe_records_attention_under_bf16_autocast():
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(8, 8), "attn": nn.MultiheadAttention(8, 2, batch_first=True)})
    x = torch.randn(2, 5, 8)
    with Probe(model, strict=True).record() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        h = model["proj"](x)  # bf16, as any autocast layer's output
        model["attn"](h, h, h)
    attention = rec["attn"].attention
    assert attention.dtype == torch.float32
    assert torch.allclose(attention.sum(-1), torch.ones(2, 2, 5), atol=1e-2)


@pytest.mark.slow
def test_bf16_mixed_trains_and_matches_fp32_numbers(tmp_path, fp32_rnn_stats):
    torch.manual_seed(0)
    stats = _grad_stats_run(tmp_path, VanillaRNNModel(lr=0.0), precision="bf16-mixed")
    assert all(math.isfinite(v) for values in stats.values() for v in values)
    _assert_close_stats(stats, fp32_rnn_stats, rel=5e-2)


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_16_mixed_with_gradscaler_reports_unscaled_gradients(tmp_path, fp32_rnn_stats, accumulate):
    """``Trainer(precision="16-mixed")`` on CPU silently becomes bf16-mixed (Lightning's choice), but the
    ``MixedPrecision("16-mixed")`` plugin with a CPU ``GradScaler`` runs for real: the hooks see gradients
    1024 times too large (and 1/k with accumulation); the callback must take both out."""

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert scaler.is_enabled()
    torch.manual_seed(0)
    stats = _grad_stats_run(tmp_path, VanillaRNNModel(lr=0.0), accumulate_grad_batches=accumulate,
                            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    # With k=2 only batch 1 (the last micro-batch of the window) is recorded.
    want = fp32_rnn_stats if accumulate == 1 else {t: v[1:] for t, v in fp32_rnn_stats.items()}
    _assert_close_stats(stats, want, rel=2e-2)


def _lstm_and_loss(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.ModuleDict({"rnn": nn.LSTM(3, 8, num_layers=2, batch_first=True), "head": nn.Linear(8, 1)})
    x = torch.randn(4, 6, 3)

    def loss_fn() -> torch.Tensor:
        out, _ = model["rnn"](x)
        return model["head"](out[:, -1]).pow(2).sum()

    return model, loss_fn


@pytest.mark.parametrize("form", ["float", "tensor", "callable"])
def test_probe_grad_scale_undoes_a_cpu_gradscaler(form):
    model, loss_fn = _lstm_and_loss()
    with Probe(model).record() as plain:
        loss_fn().backward()
    model.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # a CPU GradScaler works (torch 2.13)
    scale = {"float": 1024.0, "tensor": torch.tensor(1024.0), "callable": scaler.get_scale}[form]
    with Probe(model).record(grad_scale=scale) as scaled:
        scaler.scale(loss_fn()).backward()
    want, got = plain["rnn"], scaled["rnn"]
    assert torch.allclose(got.hidden_grad, want.hidden_grad, rtol=1e-6, atol=0)
    assert torch.allclose(got.cell_grad, want.cell_grad, rtol=1e-6, atol=0)
    # Without being told, the recorded gradient is the scaled one.
    model.zero_grad()
    with Probe(model).record() as unscaled:
        scaler.scale(loss_fn()).backward()
    assert torch.allclose(unscaled["rnn"].hidden_grad, 1024 * want.hidden_grad, rtol=1e-6, atol=0)


def test_probe_survives_an_inf_step_that_the_scaler_skips():
    model, loss_fn = _lstm_and_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with Probe(model, strict=True).record(grad_scale=scaler.get_scale) as rec:
        scaler.scale(loss_fn() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the scaler did not skip"
    assert scaler.get_scale() == 512.0
    r = rec["rnn"]
    assert r.hidden_grad is not None and not bool(r.hidden_grad.isfinite().all())
    assert bool(r.hidden.isfinite().all())  # the forward was fine
    # Drawn as such: the payload carries the flag the figure title shows, and drawing works.
    payload = render.reduce_grad_norm(r)
    assert "NaN" in payload["nonfinite"] or "Inf" in payload["nonfinite"]
    image = render.figure_to_rgb(render.draw_grad_norm(payload, step=3))
    assert image.ndim == 3 and image.shape[0] <= 800 and image.shape[1] <= 800
    render.grad_stats(r)  # statistics of a non-finite step are computed, not raised
    # The next step is recorded normally.
    opt.zero_grad()
    with Probe(model, strict=True).record(grad_scale=scaler.get_scale) as rec:
        scaler.scale(loss_fn()).backward()
    assert bool(rec["rnn"].hidden_grad.isfinite().all())


# --- manual optimization ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("call", [None, 0])
def test_manual_optimization_with_two_optimizers(tmp_path, call):
    """The LSTM runs twice a batch (once per optimizer): one warning says which call is shown, unless
    `call` picks one (here the first, whose gradients the recurrent optimizer steps on)."""
    cb = RNNViz(every_n_steps=1, validation=False, histograms=False, strict=True, call=call)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=3)
    if call is None:
        with pytest.warns(RNNVizWarning, match=r"'rnn' was called 2 times .* shows call 2 of 2.*RNNViz\(call="):
            trainer.fit(ManualTwoOptimizerModel(), loader())
    else:
        trainer.fit(ManualTwoOptimizerModel(), loader())
    assert trainer.global_step == 6  # two optimizer steps per batch
    acc = _events(trainer.logger.log_dir)
    loss_steps = [e.step for e in acc.Scalars("train_loss")]
    assert loss_steps == [0, 1, 2]
    steps = _image_steps(acc)
    assert set(steps) >= TRAIN_IMAGES
    for tag in TRAIN_IMAGES:
        assert steps[tag] == loss_steps, tag  # on the user's scalars' steps, not on global_step
    for tag, values in _scalars(acc).items():
        if "overhead" not in tag:
            assert [s for s, _ in values] == loss_steps, tag
            assert all(math.isfinite(v) for _, v in values), tag


# --- resume -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_rnnviz_instances_have_distinct_state_keys_and_both_restore(tmp_path):
    def callbacks():
        return [RNNViz(every_n_steps=1, validation=False, histograms=False),
                RNNViz(every_n_steps=3, modules=["rnn"], validation=False, histograms=False)]

    first = callbacks()
    assert first[0].state_key != first[1].state_key
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [*first, ckpt_cb], limit_train_batches=3, enable_checkpointing=True)
    torch.manual_seed(0)
    trainer.fit(TinySeqModel(), loader())
    history = [cb.decay_history["rnn"][0].clone() for cb in first]
    assert not torch.equal(history[0], history[1]), "both instances recorded the same steps"
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert {first[0].state_key, first[1].state_key} <= set(saved)

    resumed = callbacks()
    trainer = _trainer(tmp_path, [*resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
                       limit_train_batches=3, max_epochs=2, enable_checkpointing=True)
    trainer.fit(TinySeqModel(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for cb, want in zip(resumed, history, strict=True):
        assert sorted(cb.decay_history["rnn"]) == [0, 1]
        assert torch.equal(cb.decay_history["rnn"][0], want)


def test_two_rnnviz_instances_on_one_module_do_not_write_a_tag_twice_silently(tmp_path):
    cbs = [RNNViz(every_n_steps=1, validation=False, histograms=False),
           RNNViz(every_n_steps=2, modules=["rnn"], validation=False, histograms=False)]
    trainer = _trainer(tmp_path, cbs, limit_train_batches=1)
    with _all_warnings():
        trainer.fit(TinySeqModel(), loader())
    steps = _image_steps(_events(trainer.logger.log_dir))
    duplicated = {t: v for t, v in steps.items() if len(v) != len(set(v))}
    assert not duplicated, duplicated


# --- loop configurations ----------------------------------------------------------------------------
def test_fast_dev_run_warns_that_nothing_is_drawn_and_trains(tmp_path):
    """``fast_dev_run`` swaps the logger for a ``DummyLogger``: nowhere to write, one warning."""
    trainer = _trainer(tmp_path, [RNNViz()], fast_dev_run=True)
    with _all_warnings() as caught:
        trainer.fit(TinySeqModel(), loader(), loader())
    assert trainer.state.finished
    messages = _rnnviz_warnings(caught)
    assert len(messages) == 1 and "nowhere to write" in messages[0]


def test_limit_val_batches_zero_draws_training_only(tmp_path):
    cb = RNNViz(every_n_steps=1, histograms=False, strict=True)
    trainer = _trainer(tmp_path, [cb], limit_val_batches=0)
    trainer.fit(TinySeqModel(), loader(), loader())
    steps = _image_steps(_events(trainer.logger.log_dir))
    assert set(steps) == TRAIN_IMAGES | {"rnnviz/grad_decay/rnn"}
    assert all(steps[t] == [0, 1] for t in TRAIN_IMAGES)


def test_model_without_validation_step(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz(every_n_steps=1, histograms=False, strict=True)])
    trainer.fit(NoValidationStepModel(), loader())
    steps = _image_steps(_events(trainer.logger.log_dir))
    assert set(steps) == TRAIN_IMAGES | {"rnnviz/grad_decay/rnn"}


@pytest.mark.slow
def test_sanity_check_and_two_val_dataloaders(tmp_path):
    """Validation draws batch 0 of dataloader 0 once per validation run, never during the sanity check.

    The three loaders have different sequence lengths; the ``labels`` function sees which batch is drawn.
    """
    seen: list[int] = []

    def labels(batch):
        seen.append(batch[0].shape[1])
        return [str(i) for i in range(batch[0].shape[1])]

    cb = RNNViz(every_n_steps=1, labels=labels, histograms=False, strict=True)
    trainer = _trainer(tmp_path, [cb], num_sanity_val_steps=2, limit_val_batches=2, val_check_interval=1)
    trainer.fit(TwoValLoadersModel(), loader(steps=6), [loader(steps=7), loader(steps=9)])
    acc = _events(trainer.logger.log_dir)
    steps = _image_steps(acc)
    _assert_each_image_once_per_step(steps)
    val_steps = [e.step for e in acc.Scalars("val_loss/dataloader_idx_0")]
    assert len(val_steps) == 2  # one validation run after each of the 2 batches
    for tag in ("rnnviz/val/hidden/rnn", "rnnviz/val/gates/rnn", "rnnviz/val/attention/attn"):
        assert steps[tag] == val_steps, tag
    # 2 training + 2 validation draws: none from the sanity check (it would make 3 of T=7), none from
    # dataloader 1 (T=9).
    assert Counter(seen) == {6: 2, 7: 2}, seen


def test_rnn_created_in_configure_model(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz(every_n_steps=1, validation=False, histograms=False, strict=True)],
                       limit_train_batches=1)
    trainer.fit(ConfigureModelSeqModel(), loader())
    steps = _image_steps(_events(trainer.logger.log_dir))
    assert all(steps[t] == [0] for t in TRAIN_IMAGES)


# --- torch.compile and activation checkpointing -----------------------------------------------------
@pytest.fixture(scope="module")
def projected_plain_stats(tmp_path_factory) -> dict[str, list[float]]:
    torch.manual_seed(0)
    return _grad_stats_run(tmp_path_factory.mktemp("plain"), ProjectedSeqModel())


@pytest.mark.slow
# torch's own warnings while dynamo traces: a deprecation, and (while tracing the probe's forward hook,
# which runs inside the compiled frame) a UserWarning about reading `.grad` of a non-leaf tensor. Both are
# invisible in a normal run; as errors (this suite's setting) dynamo turns them into a failed capture.
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning",
                            "ignore:.*grad attribute of a Tensor that is not a leaf.*:UserWarning")
def test_compiled_rnn_submodule_records_the_same_numbers(tmp_path, projected_plain_stats):
    """``torch.compile(nn.LSTM)`` as a submodule: recorded under ``rnn._orig_mod``, same numbers."""
    torch.manual_seed(0)
    model = ProjectedSeqModel(compile_rnn=True)
    started = time.monotonic()
    try:
        stats = _grad_stats_run(tmp_path, model)
    except Exception as error:
        if not type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        pytest.skip(f"torch.compile does not work on this machine: {type(error).__name__}: {error}")
    print(f"compiled run: {time.monotonic() - started:.1f} s")
    renamed = {t.replace("rnn._orig_mod/", "rnn/"): v for t, v in stats.items()}
    # The wrapper is not a recurrent module: naming it fails at once, pointing at the supported types.
    with pytest.raises(ValueError, match=r"'rnn'.*unsupported type \(OptimizedModule\)"):
        Probe(model, modules=["rnn"])
    assert set(stats) == {t.replace("rnn/", "rnn._orig_mod/") for t in projected_plain_stats}
    _assert_close_stats(renamed, projected_plain_stats, rel=1e-5)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_probe_under_activation_checkpointing_matches_plain(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(3, 3), "rnn": nn.LSTM(3, 8, num_layers=2, batch_first=True),
                           "head": nn.Linear(8, 1)})
    x = torch.randn(4, 6, 3)

    def run(use_checkpoint: bool):
        with Probe(model, strict=True).record() as rec:
            z = model["proj"](x)
            if use_checkpoint:
                out, _ = checkpoint(model["rnn"], z, use_reentrant=reentrant)
            else:
                out, _ = model["rnn"](z)
            model["head"](out[:, -1]).pow(2).sum().backward()
        return rec["rnn"]

    plain, ckpt = run(False), run(True)
    assert torch.equal(ckpt.hidden, plain.hidden)
    for name in ("input", "forget", "cell", "output"):
        assert torch.equal(ckpt.gates[name], plain.gates[name])
    assert torch.allclose(ckpt.hidden_grad, plain.hidden_grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ckpt.cell_grad, plain.cell_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_activation_checkpointing_in_training_step(tmp_path, mode, projected_plain_stats):
    torch.manual_seed(0)
    stats = _grad_stats_run(tmp_path, ProjectedSeqModel(checkpoint=mode))
    _assert_close_stats(stats, projected_plain_stats, rel=1e-5)


# --- variable lengths, extremes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lengths", "batch_size"),
    [([6, 3, 5, 1], 4), ([5], 1), ([1, 1, 1, 1], 4)],
    ids=["packed_variable_lengths", "batch_size_1", "sequence_length_1"],
)
def test_packed_bidirectional_lstm(tmp_path, lengths, batch_size):
    cb = RNNViz(every_n_steps=1, validation=False, strict=True)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=1)
    trainer.fit(PackedBiLSTMModel(), padded_loader(lengths, batch_size=batch_size))
    acc = _events(trainer.logger.log_dir)
    steps = _image_steps(acc)
    assert set(steps) == RNN_IMAGES | {"rnnviz/grad_decay/rnn"}
    scalars = _scalars(acc)
    for stat in ("first_norm", "last_norm"):
        for row in ("layer0", "layer0_reverse"):
            values = [v for _, v in scalars[f"rnnviz/grad_norm/rnn/{stat}/{row}"]]
            assert values and all(math.isfinite(v) and v > 0 for v in values), (stat, row, values)


@pytest.mark.slow
def test_long_wide_packed_sequence_gives_bounded_images(tmp_path):
    """T=1500, hidden 300, bidirectional, two sequences (1500 and 700 steps), one recorded step."""
    cb = RNNViz(every_n_steps=1, max_samples=1, validation=False, histograms=False, strict=True)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=1)
    started = time.monotonic()
    model = PackedBiLSTMModel(features=4, hidden=300)
    trainer.fit(model, padded_loader([1500, 700], features=4, batch_size=2))
    print(f"T=1500 hidden=300 bidirectional, 1 recorded step: {time.monotonic() - started:.1f} s")
    acc = _events(trainer.logger.log_dir)
    steps = _image_steps(acc)
    assert set(steps) >= RNN_IMAGES
    for tag in steps:
        for event in acc.Images(tag):
            assert event.width <= 800 and event.height <= 800, (tag, event.width, event.height)
            assert len(event.encoded_image_string) < 150_000, (tag, len(event.encoded_image_string))


# --- faults -----------------------------------------------------------------------------------------
def _nan_loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, 3, generator=gen)
    x[1, 2, 0] = float("nan")  # one value of one sequence of the first batch
    y = x.sum((1, 2)).nan_to_num() / 4
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.mark.slow
def test_nan_in_activations_training_goes_on_and_warnings_are_not_repeated(tmp_path):
    cb = RNNViz(every_n_steps=1, validation=False)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=3)
    with _all_warnings() as caught:
        trainer.fit(TinySeqModel(), _nan_loader())
    assert trainer.state.finished
    messages = _rnnviz_warnings(caught)
    print("RNNViz warnings:", messages, "error_counts:", dict(cb.error_counts))
    kinds = Counter(_kind(m) for m in messages)
    assert all(n == 1 for n in kinds.values()), kinds
    steps = _image_steps(_events(trainer.logger.log_dir))
    for tag in TRAIN_IMAGES:
        # NaN everywhere after step 0 (the update spreads it): still drawn.
        assert steps[tag] == [0, 1, 2], tag


def test_nan_in_activations_is_warned_once(tmp_path):
    cb = RNNViz(every_n_steps=1, validation=False, histograms=False)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=1)
    with _all_warnings() as caught:
        trainer.fit(TinySeqModel(), _nan_loader())
    nan_warnings = [m for m in _rnnviz_warnings(caught) if "nan" in m.lower() or "non-finite" in m.lower()]
    assert len(nan_warnings) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["exception", "keyboard_interrupt"])
def test_fault_in_training_step_cleans_up(tmp_path, fault):
    """Hooks removed, images of earlier steps on disk, no thread or process left behind."""
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = _child_pids()
    mp_before = set(multiprocessing.active_children())
    model = TinySeqModel(fail_at=2) if fault == "exception" else InterruptModel(interrupt_at=2)
    cb = RNNViz(every_n_steps=1, validation=False)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=4)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        if fault == "exception":
            with pytest.raises(RuntimeError, match="boom"):
                trainer.fit(model, loader())
        else:
            # Lightning catches the interrupt and shuts down gracefully; since 2.2 it then exits with status 1.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected KeyboardInterrupt")
                with contextlib.suppress(SystemExit):
                    trainer.fit(model, loader())
            assert trainer.interrupted
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after an interrupt
    assert _hook_count(model) == 0
    acc = _events(trainer.logger.log_dir)
    steps = _image_steps(acc)
    for tag in TRAIN_IMAGES:
        assert steps[tag] == [0, 1], tag  # what was recorded before the fault reached the disk
    assert [s for s, _ in _scalars(acc)["rnnviz/grad_norm/rnn/first_norm/layer0"]] == [0, 1]
    assert _new_threads(threads_before) == []
    assert _child_pids() - children_before == set()
    assert set(multiprocessing.active_children()) - mp_before == set()


def _raise(*args, **kwargs):
    raise RuntimeError("render boom")


@pytest.mark.slow
def test_error_in_our_render_code_is_warned_once_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "reduce_hidden", _raise)
    cb = RNNViz(every_n_steps=1, validation=False, histograms=False)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=3)
    with _all_warnings() as caught:
        trainer.fit(TinySeqModel(), loader())
    assert trainer.state.finished
    messages = _rnnviz_warnings(caught)
    assert len(messages) == 1 and "render boom" in messages[0] and "'rnn'" in messages[0], messages
    assert [n for what, n in cb.error_counts.items() if "hidden" in what] == [3]
    steps = _image_steps(_events(trainer.logger.log_dir))
    # the failed stage skips the module's later stages in each recording (a record our code could not
    # reduce once is not read on); the other modules go on
    assert not [tag for tag in steps if tag.endswith("/rnn")], steps
    assert steps["rnnviz/attention/attn"] == [0, 1, 2]


def test_error_in_our_render_code_propagates_with_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "reduce_hidden", _raise)
    children_before = _child_pids()
    model = TinySeqModel()
    trainer = _trainer(tmp_path, [RNNViz(every_n_steps=1, validation=False, histograms=False, strict=True)])
    with pytest.raises(RuntimeError, match="render boom"):
        trainer.fit(model, loader())
    assert _hook_count(model) == 0
    assert _child_pids() - children_before == set()


@pytest.mark.slow
def test_error_in_the_drawing_process_is_warned_once_and_counted(tmp_path, monkeypatch):
    """A payload the drawing process cannot draw: it reports back, the callback warns once and counts."""
    monkeypatch.setattr(render, "reduce_hidden", lambda *args, **kwargs: {"not": "a hidden-state payload"})
    cb = RNNViz(every_n_steps=1, validation=False, histograms=False, background=True)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=3)
    with _all_warnings() as caught:
        trainer.fit(TinySeqModel(), loader())
    assert trainer.state.finished
    messages = _rnnviz_warnings(caught)
    assert len(messages) == 1 and "hidden" in messages[0], messages
    assert sum(cb.error_counts.values()) == 3, cb.error_counts
    steps = _image_steps(_events(trainer.logger.log_dir))
    assert "rnnviz/hidden/rnn" not in steps and steps["rnnviz/gates/rnn"] == [0, 1, 2]


# --- soak -------------------------------------------------------------------------------------------
class _Soak(Callback):
    """Samples memory, hooks and child processes every 50 steps, after ``RNNViz`` (later in the list)."""

    def __init__(self) -> None:
        self.samples: list[dict] = []
        self.step_s: list[float] = []
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.step_s.append(now - self._t)
        self._t = now
        assert _hook_count(pl_module) == 0, "hooks left after a recording step"
        step = trainer.global_step
        if step % 50 == 0:
            gc.collect()
            from matplotlib.figure import Figure

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # isinstance on deprecated torch proxies warns
                figures = sum(isinstance(o, Figure) for o in gc.get_objects())
            self.samples.append({
                "step": step,
                "rss": _rss_mb(),
                "children": {pid: _rss_mb(pid) for pid in _child_pids()},
                "figures": figures,
            })


def _bytes_per_step(path: Path) -> dict[int, int]:
    sizes: dict[int, int] = defaultdict(int)
    for event in EventFileLoader(str(path)).Load():
        if event.HasField("summary"):
            sizes[event.step] += event.ByteSize()
    return sizes


@pytest.mark.slow
def test_soak_400_recording_steps(tmp_path):
    """Every step recorded, histograms on, 25 epochs (the gradient-decay history grows to 25 curves)."""
    soak = _Soak()
    cb = RNNViz(every_n_steps=1, validation=False, histograms=True)
    trainer = _trainer(tmp_path, [cb, soak], max_epochs=-1, max_steps=400, limit_train_batches=None)
    started = time.monotonic()
    with _all_warnings() as caught:
        trainer.fit(TinySeqModel(hidden=4), loader(n=64, steps=5, batch_size=4))  # 16 steps an epoch
    elapsed = time.monotonic() - started
    shutdown = time.perf_counter() - soak._t  # from the last step's end to fit's return
    messages = _rnnviz_warnings(caught)
    assert trainer.global_step == 400 and not cb.error_counts, cb.error_counts
    # On 2 busy cores the drawing process cannot draw 4 figures a step; dropping is by design, warned once.
    assert all("dropped" in m for m in messages) and len(messages) <= 1, messages
    # Warm-up: the first 100 steps (the drawing process loads fonts and caches while it starts drawing).
    warm, last = soak.samples[1], soak.samples[-1]
    assert (warm["step"], last["step"]) == (100, 400)
    child_growth = {pid: last["children"][pid] - rss for pid, rss in warm["children"].items()
                    if pid in last["children"]}
    half = len(soak.step_s) // 2
    log_dir = Path(trainer.logger.log_dir)
    per_file = {p.name: _bytes_per_step(p) for p in log_dir.glob("events.out.tfevents.*")}
    images = {tag: len(v) for tag, v in _image_steps(_events(log_dir)).items()}
    print(f"\nsoak: {elapsed:.0f} s, of which {shutdown:.0f} s after the last step (drawing the backlog); "
          f"RSS step 100 -> 400: {warm['rss']:.1f} -> {last['rss']:.1f} MB; drawing process RSS every 50 "
          f"steps: {[list(x['children'].values()) for x in soak.samples]} MB; matplotlib figures alive here: "
          f"{last['figures']}")
    print(f"soak: mean step {1e3 * sum(soak.step_s[1:half]) / (half - 1):.0f} ms (first half), "
          f"{1e3 * sum(soak.step_s[half:]) / (len(soak.step_s) - half):.0f} ms (second half)")
    print(f"soak: images written per tag {images}; warnings {messages}")
    for name, sizes in per_file.items():
        total = sum(sizes.values())
        print(f"soak: {name}: {total} bytes, {total / 400:.0f} bytes per recording step")
    assert last["rss"] - warm["rss"] <= 40, "training process memory grows"
    assert all(g <= 40 for g in child_growth.values()), f"drawing process memory grows: {child_growth}"
    assert last["figures"] <= warm["figures"], "matplotlib figures accumulate in the training process"
    # Event-file growth is linear: the logger's file (scalars, histograms) costs the same every step.
    main = next(sizes for name, sizes in per_file.items() if not name.endswith(".rnnviz"))
    window = [main[s] for s in range(100, 400)]
    median = sorted(window)[len(window) // 2]
    assert min(window) >= 0.8 * median and max(window) <= 1.25 * median, (min(window), median, max(window))


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1, 2.5, 3.0, "5", True])
def test_every_n_steps_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=r"`every_n_steps` must be a positive int"):
        RNNViz(every_n_steps=value)


def test_pattern_matching_no_module_fails_at_fit_start_listing_names(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz(modules=["encoder.*"])])
    match = r"`modules` entry 'encoder\.\*' matches no module.*available:.*'rnn'"
    with pytest.raises(ValueError, match=match):
        trainer.fit(TinySeqModel(), loader())


def test_unsupported_module_named_explicitly_fails_at_fit_start(tmp_path):
    model = TinySeqModel()
    trainer = _trainer(tmp_path, [RNNViz(modules=["rnn", "head"])])
    with pytest.raises(ValueError, match=r"`modules` entry 'head'.*unsupported type \(Linear\).*attention="):
        trainer.fit(model, loader())
    assert _hook_count(model) == 0
    with pytest.raises(ValueError, match="unsupported type"):
        Probe(model, modules=["head"])


def test_labels_wrong_length_names_the_argument_and_the_fix(tmp_path):
    """(Warned at the step, not at fit start: the length is known only then.) See also test_rnnviz.py."""
    cb = RNNViz(every_n_steps=1, labels=lambda batch: ["x"] * 3, validation=False, histograms=False)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=1)
    with pytest.warns(RNNVizWarning, match=r"`labels\(batch\)` returned 3 .*one token per time step"):
        trainer.fit(TinySeqModel(), loader())


def test_sample_past_the_batch_is_reported(tmp_path):
    cb = RNNViz(every_n_steps=1, sample=5, max_samples=None, validation=False, histograms=False)
    trainer = _trainer(tmp_path, [cb], limit_train_batches=1)
    with _all_warnings() as caught:
        trainer.fit(TinySeqModel(), loader(batch_size=4))
    assert any("sample" in m for m in _rnnviz_warnings(caught))


def test_module_names_are_made_safe_in_paths_and_tags(tmp_path):
    model = TinySeqModel()
    model.add_module("enc/rnn:1 x", nn.GRU(3, 4, batch_first=True))
    original = model.forward

    def forward(x):
        getattr(model, "enc/rnn:1 x")(x)[0].sum()
        return original(x)

    model.forward = forward
    cb = RNNViz(every_n_steps=1, modules=["enc/rnn:1 x"], validation=False, histograms=False, strict=True)
    trainer = _trainer(tmp_path, [cb], logger="csv", limit_train_batches=1)
    trainer.fit(model, loader())
    root = Path(trainer.logger.log_dir) / "rnnviz"
    pngs = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    # Its output does not reach the loss: hidden states and gates, no gradient figure.
    assert pngs == ["gates/enc_rnn_1_x/step_0.png", "hidden/enc_rnn_1_x/step_0.png"], pngs
