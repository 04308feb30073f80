"""Real Trainer runs on tiny models; the event files are read back and checked tag by tag, step by step."""

from __future__ import annotations

import contextlib
import copy
import csv
import gc
import weakref
from pathlib import Path

import pytest
import torch

from lightning_rnnviz import (
    AttentionMonitor,
    GateActivationMonitor,
    GradientNormMonitor,
    HiddenStateMonitor,
    Probe,
    RNNViz,
    RNNVizWarning,
)
from tests.helpers.events import RunEvents, run_dirs, tag_kinds
from tests.helpers.models import NoRNNModel, TinySeqModel, loader
from tests.helpers.namespace import CSVLogger, TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*Checkpoint directory.*",
    "ignore:.*log_every_n_steps.*", "ignore:.*val_dataloader.*", "ignore:.*dirpath has changed.*",
)

RNN_IMAGES = {"rnnviz/hidden/rnn", "rnnviz/gates/rnn", "rnnviz/grad_norm/rnn"}
TRAIN_IMAGES = RNN_IMAGES | {"rnnviz/attention/attn"}
VAL_IMAGES = {"rnnviz/val/hidden/rnn", "rnnviz/val/gates/rnn", "rnnviz/val/attention/attn"}


def _trainer(tmp_path: Path, callbacks, logger="tb", **kwargs) -> pl.Trainer:
    if logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="tb")
    elif logger == "csv":
        logger = CSVLogger(tmp_path, name="csv")
    defaults = dict(
        max_epochs=2, log_every_n_steps=3, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=logger, callbacks=callbacks, num_sanity_val_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _events(trainer: pl.Trainer) -> RunEvents:
    return RunEvents(trainer.logger.log_dir)


def _image_steps(acc: RunEvents) -> dict[str, list[int]]:
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_tags_steps_and_sizes_follow_lightning_logging(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [RNNViz(strict=True)])
    trainer.fit(TinySeqModel(), loader(), loader())
    acc = _events(trainer)
    steps = _image_steps(acc)
    # 4 batches per epoch, log_every_n_steps=3: Lightning logs at steps 2 and 5; the very first batch
    # (step 0) is recorded as well.
    loss_steps = [e.step for e in acc.Scalars("train_loss")]
    assert loss_steps == [2, 5]
    for tag in TRAIN_IMAGES:
        assert steps[tag] == [0, 2, 5], tag
        assert set(loss_steps) <= set(steps[tag])
    # Validation: once per run (not during the sanity check), on the step of the user's val scalars.
    val_steps = [e.step for e in acc.Scalars("val_loss")]
    for tag in VAL_IMAGES:
        assert steps[tag] == val_steps == [3, 7], tag
    assert steps["rnnviz/grad_decay/rnn"] == [4, 8]
    assert set(steps) == TRAIN_IMAGES | VAL_IMAGES | {"rnnviz/grad_decay/rnn"}
    for tag in steps:
        for event in acc.Images(tag):
            assert 200 <= event.width <= 800 and 200 <= event.height <= 800
            assert len(event.encoded_image_string) < 150_000
    scalars = set(acc.Tags()["scalars"])
    for stat in ("first_norm", "last_norm", "log10_ratio", "horizon"):
        assert f"rnnviz/grad_norm/rnn/{stat}/layer1" in scalars
    for gate in ("input", "forget", "cell", "output"):
        assert f"rnnviz/gates/rnn/{gate}_mean/layer0" in scalars
    assert {"rnnviz/hidden/rnn/mean_abs/layer0", "rnnviz/attention/attn/entropy_norm/head1"} <= scalars
    assert [e.step for e in acc.Scalars("rnnviz/grad_norm/rnn/first_norm/layer0")] == [0, 2, 5]
    # the rest only with scalars="all" (tests/callbacks/test_scalars.py)
    assert not {t for t in scalars if t.startswith("rnnviz/overhead/") or t.endswith("/exact")
                or "saturated" in t or "/focus/" in t or "/entropy/" in t or "decay_per_step" in t}
    histograms = set(acc.Tags()["histograms"])
    assert {"rnnviz/hidden_dist/rnn", "rnnviz/gates_dist/rnn/forget", "rnnviz/val/hidden_dist/rnn"} <= histograms
    assert all(tag.startswith("rnnviz/") for tag in steps)


def test_every_tag_has_one_plugin_and_every_run_one_writer(tmp_path):
    """TensorBoard gives a (run, tag) to one plugin (an image and a histogram under one tag break both), and
    its Python loader follows only the last event file of a directory: check everything a real run writes."""
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [RNNViz(strict=True), GradientNormMonitor(strict=True)])
    trainer.fit(TinySeqModel(), loader(), loader())
    log_dir = Path(trainer.logger.log_dir)
    kinds = tag_kinds(log_dir)
    assert {tag: k for tag, k in kinds.items() if len(k) != 1} == {}
    runs = {run for run, _ in kinds}
    assert runs == {".", "rnnviz"}  # the logger's run, and ours beside it
    assert all(tag.startswith("rnnviz/") or tag == "custom_scalars__config__"
               for run, tag in kinds if run == "rnnviz")
    assert {tag for run, tag in kinds if run == "."} >= {"train_loss", "val_loss"}
    for directory in run_dirs(log_dir):
        assert len(list(directory.glob("*tfevents*"))) == 1, directory
    plugins = {tag: next(iter(k)) for (run, tag), k in kinds.items()}
    assert plugins["rnnviz/hidden/rnn"] == "images" and plugins["rnnviz/hidden_dist/rnn"] == "histograms"
    assert plugins["rnnviz/val/hidden_dist/rnn"] == "histograms" and plugins["rnnviz/gates_dist/rnn/forget"] == "histograms"
    assert plugins["custom_scalars__config__"] == "custom_scalars"


class _LookBeforeStep1(pl.Callback):
    """At the start of the second training step, reads what the run directory already holds."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            events = RunEvents(trainer.logger.log_dir)
            self.seen = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags().get("images", [])}


def test_first_pictures_are_on_disk_before_the_second_step(tmp_path):
    look = _LookBeforeStep1()
    trainer = _trainer(tmp_path, [RNNViz(strict=True), look], max_epochs=1, limit_train_batches=2)
    trainer.fit(TinySeqModel(), loader())
    assert look.seen == {tag: [0] for tag in TRAIN_IMAGES}


@pytest.mark.parametrize(
    ("renderer", "background", "placement"),
    [("fast", None, "inline"), ("fast", True, "process"), ("fast", "thread", "thread"),
     ("matplotlib", None, "process"), ("matplotlib", False, "inline"), ("matplotlib", "thread", "thread")],
)
def test_every_renderer_and_placement_writes_the_same_pictures(tmp_path, monkeypatch, renderer, background,
                                                               placement):
    """The default paints on the training thread (on 2 busy cores); matplotlib figures default to the
    drawing process."""
    import lightning_rnnviz.callbacks.rnnviz as module

    monkeypatch.setattr(module, "spare_cores", lambda **kw: 0)  # as on this project's 2-core machines
    cb = RNNViz(renderer=renderer, background=background, validation=False, strict=True, scalars="all")
    in_child = placement in ("process", "thread")  # the worker's pictures are drawn by a process too
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(TinySeqModel(), loader())
    acc = _events(trainer)
    steps = _image_steps(acc)
    assert set(steps) == TRAIN_IMAGES | {"rnnviz/grad_decay/rnn"}
    assert all(steps[tag] == [0, 2, 5] for tag in TRAIN_IMAGES)
    assert cb.placement == placement
    assert (cb.drawer_peak_rss_mb is not None) is in_child  # only a drawing process reports its peak
    render_ms = [e.value for e in acc.Scalars("rnnviz/overhead/render_ms")]
    write_ms = [e.value for e in acc.Scalars("rnnviz/overhead/write_ms")]
    # Only the training thread writes (one writer per run directory); a drawing process or the recording
    # worker draws and encodes.
    assert all(v > 0 for v in write_ms)
    if placement == "process":  # the training thread does not draw
        assert render_ms == [0.0, 0.0, 0.0]
    else:  # drawn on the training thread, or by the worker, which reports it with its own time
        assert all(v > 0 for v in render_ms)
    offthread = {e.step: e.value for e in acc.Scalars("rnnviz/overhead/offthread_ms")} if placement == "thread" else {}
    assert sorted(offthread) == ([0, 2, 5] if placement == "thread" else [])
    assert all(v > 0 for v in offthread.values())


def test_every_n_steps_overrides_log_every_n_steps(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz(every_n_steps=2, log_first_step=False, validation=False)])
    trainer.fit(TinySeqModel(), loader(), loader())
    steps = _image_steps(_events(trainer))
    assert steps["rnnviz/hidden/rnn"] == [1, 3, 5, 7]
    assert not any(tag.startswith("rnnviz/val/") for tag in steps)


def test_gradient_units_do_not_depend_on_accumulation(tmp_path):
    """With lr=0 the weights never move: the same micro-batch must give the same dL/dh_t for any k."""
    values = {}
    for k in (1, 2):
        cb = GradientNormMonitor(every_n_steps=1, log_first_step=False, validation=False)
        trainer = _trainer(tmp_path / f"k{k}", [cb], max_epochs=1, accumulate_grad_batches=k)
        torch.manual_seed(0)
        trainer.fit(TinySeqModel(lr=0.0), loader(), loader())
        acc = _events(trainer)
        # Batch 1 is recorded in both runs (for k=2 it closes the first accumulation window).
        events = acc.Scalars("rnnviz/grad_norm/rnn/first_norm/layer0")
        values[k] = events[1].value if k == 1 else events[0].value
        if k == 2:
            assert [e.step for e in events] == [0, 1]
    assert values[1] == pytest.approx(values[2], rel=1e-6)


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    params = []
    for callbacks in ([], [RNNViz(every_n_steps=1, strict=True)]):
        pl.seed_everything(7)
        model = TinySeqModel()
        trainer = _trainer(tmp_path, callbacks, max_epochs=2)
        trainer.fit(model, loader(), loader())
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name


@pytest.mark.parametrize("background", [False, "thread"])  # the training thread, or the recording worker
def test_several_monitors_share_one_recording_per_step(tmp_path, monkeypatch, background):
    calls = []
    original = Probe.capture

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("max_samples"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Probe, "capture", counting)
    kw = dict(validation=False, background=background, save_records="full")
    monitors = [HiddenStateMonitor(**kw), GateActivationMonitor(**kw), GradientNormMonitor(**kw), AttentionMonitor(**kw)]
    trainer = _trainer(tmp_path, monitors, max_epochs=1)
    trainer.fit(TinySeqModel(), loader())
    assert len(calls) == 2  # steps 0 (first step) and 2 (log_every_n_steps=3)
    steps = _image_steps(_events(trainer))
    assert set(steps) == TRAIN_IMAGES | {"rnnviz/grad_decay/rnn"}
    assert all(len(v) == len(set(v)) for v in steps.values()), "an image was written twice on one step"
    from lightning_rnnviz import load_records

    kept = {s.step: s for s in load_records(trainer.logger.log_dir)}  # (and the epoch end's grad_decay)
    for step in (0, 2):  # every monitor's modules, the last recording too
        assert {"rnnviz/rnn", "rnnviz/attn"} <= set(kept[step].records), step


def test_csv_logger_gets_png_files_and_scalars(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz(validation=False)], logger="csv", max_epochs=1)
    trainer.fit(TinySeqModel(), loader())
    root = Path(trainer.logger.log_dir) / "rnnviz"
    assert sorted(p.name for p in (root / "hidden" / "rnn").iterdir()) == ["step_0.png", "step_2.png"]
    assert (root / "attention" / "attn" / "step_2.png").stat().st_size > 1000
    assert (root / "grad_decay" / "rnn" / "step_4.png").exists()
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "rnnviz/grad_norm/rnn/first_norm/layer0" in header


def test_no_logger_warns_once_and_training_runs(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz()], logger=False, max_epochs=1)
    with pytest.warns(RNNVizWarning, match="no logger"):
        trainer.fit(TinySeqModel(), loader())
    assert trainer.state.finished


def test_model_without_supported_module_warns_and_runs(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz()], max_epochs=1)
    with pytest.warns(RNNVizWarning, match="no module lightning_rnnviz can record"):
        trainer.fit(NoRNNModel(), loader())
    assert trainer.state.finished
    assert not _image_steps(_events(trainer))


def test_attention_monitor_on_model_without_attention_warns(tmp_path):
    class RNNOnly(TinySeqModel):
        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)

    model = RNNOnly()
    del model.attn
    trainer = _trainer(tmp_path, [AttentionMonitor()], max_epochs=1)
    with pytest.warns(RNNVizWarning, match="no module to watch"):
        trainer.fit(model, loader())


def test_unknown_module_name_fails_at_fit_start_listing_names(tmp_path):
    trainer = _trainer(tmp_path, [RNNViz(modules=["encoder.rnn"])], max_epochs=1)
    with pytest.raises(ValueError, match=r"'encoder.rnn'.*available:.*'rnn' \(LSTM\)"):
        trainer.fit(TinySeqModel(), loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": -3}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"top_k": 0}, "top_k"),
        ({"max_samples": 0}, "max_samples"),
        ({"sample": 20, "max_samples": 16}, "sample=20"),
        ({"labels": "tokens"}, "labels"),
        ({"renderer": "seaborn"}, "renderer"),
        ({"background": "yes"}, "background"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RNNViz(**kwargs)


def test_labels_wrong_length_is_warned_not_fatal(tmp_path):
    cb = RNNViz(labels=lambda batch: ["a", "b"], validation=False)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    with pytest.warns(RNNVizWarning, match="returned 2 input tokens"):
        trainer.fit(TinySeqModel(), loader())
    assert cb.error_counts["use the `labels` tokens"] >= 1
    assert "rnnviz/hidden/rnn" in _image_steps(_events(trainer))


def test_labels_right_length(tmp_path):
    cb = RNNViz(labels=lambda batch: [f"t{i}" for i in range(batch[0].shape[1])], strict=True, validation=False)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(TinySeqModel(), loader())
    assert "rnnviz/attention/attn" in _image_steps(_events(trainer))


def test_decay_history_survives_checkpoint_resume(tmp_path):
    cb = RNNViz(validation=False)
    trainer = _trainer(tmp_path, [cb], max_epochs=2, enable_checkpointing=True)
    trainer.fit(TinySeqModel(), loader())
    assert sorted(cb.decay_history["rnn"]) == [0, 1]
    assert cb.decay_history["rnn"][0].shape == (2, 6)
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))

    resumed = RNNViz(validation=False)
    trainer = _trainer(tmp_path, [resumed], max_epochs=3, enable_checkpointing=True)
    trainer.fit(TinySeqModel(), loader(), ckpt_path=ckpt)
    assert sorted(resumed.decay_history["rnn"]) == [0, 1, 2]
    assert torch.equal(resumed.decay_history["rnn"][0], cb.decay_history["rnn"][0])


def test_state_keys_differ_with_settings():
    assert RNNViz().state_key != RNNViz(every_n_steps=5).state_key
    assert RNNViz().state_key != HiddenStateMonitor().state_key


def test_state_key_is_built_at_fit_start_and_follows_settings_after_the_fit(tmp_path, monkeypatch):
    """Lightning reads ``state_key`` on every hook call; during a fit it is the key of the fit's settings,
    built once, and after the fit a changed setting changes it again."""
    built = []
    original = RNNViz._generate_state_key

    def counting(self, **kwargs):
        built.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(RNNViz, "_generate_state_key", counting)
    cb = RNNViz(validation=False)
    before = cb.state_key
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(TinySeqModel(), loader())
    assert len(built) == 1 and cb.state_key == before  # 4 batches, some 30 hook calls, one key
    cb.every_n_steps = 5
    assert cb.state_key != before == RNNViz(validation=False).state_key
    assert cb.state_key == RNNViz(every_n_steps=5).state_key


@pytest.mark.parametrize("background", [False, "thread"])  # the training thread, or the recording worker
def test_a_batch_nobody_records_opens_and_closes_nothing(tmp_path, monkeypatch, background):
    """On the batches between recordings the callback's hooks return without any of the recording's work:
    no block opened or closed, nothing guarded, nothing delivered."""
    from lightning_rnnviz.pipeline.recorder import Recorder
    from lightning_rnnviz.render.report import Guard

    calls = []
    for cls, name in ((Recorder, "begin"), (Recorder, "end"), (Recorder, "deliver"), (Guard, "run")):
        original = getattr(cls, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            if _name != "deliver" or not args[1].has_ready:  # a delivery of nothing is work for nothing
                calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counting)
    cb = RNNViz(every_n_steps=4, validation=False, background=background, strict=True)

    class Between(pl.Callback):  # what the callback did on each batch: from its batch start to the next
        seen: list[list[str]] = []

        def on_train_batch_start(self, *args):
            Between.seen.append(calls[:])
            calls.clear()

    trainer = _trainer(tmp_path, [Between(), cb], max_epochs=3)  # 12 batches; records 0, 3, 7, 11
    trainer.fit(TinySeqModel(), loader())
    work = Between.seen[1:] + [calls]  # per batch, its start to the next start (the last: to the end)
    recorded = {0, 3, 7, 11}
    assert _image_steps(_events(trainer))["rnnviz/hidden/rnn"] == sorted(recorded)
    idle = [step for step in range(12) if step not in recorded and step - 1 not in recorded]
    assert idle == [2, 5, 6, 9, 10]
    for step in idle:  # the worker's finished recordings and epoch ends are delivered when ready (guarded)
        assert [name for name in work[step] if name != "run" or background is False] == [], (step, work[step])
    for step in recorded:
        assert "begin" in work[step], (step, work[step])


def test_callback_pickles_before_fit():
    import pickle

    cb = RNNViz(attention=None, labels=None)
    assert isinstance(pickle.loads(pickle.dumps(cb)), RNNViz)
    copy.deepcopy(cb)


def test_exception_in_training_step_leaves_no_hooks(tmp_path):
    model = TinySeqModel(fail_at=2)
    trainer = _trainer(tmp_path, [RNNViz(every_n_steps=1)], max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, loader())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module


class _ThreadsSeen(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(torch.get_num_threads())

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(torch.get_num_threads())


def test_intra_op_threads_are_restored_after_every_recording(tmp_path):
    """The callback reduces on one thread and gives the user's thread count back before anyone else runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = _ThreadsSeen()  # after RNNViz in the list: sees the state RNNViz leaves
        trainer = _trainer(tmp_path, [RNNViz(every_n_steps=1, validation=False), seen], max_epochs=1)
        trainer.fit(TinySeqModel(), loader())
        assert seen.seen and set(seen.seen) == {2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_callback_never_calls_torch_set_num_threads(tmp_path, monkeypatch):
    """`torch.set_num_threads`, even with the count unchanged, left every later training step slower (4-7 %
    on fast-step) and marks the count as the user's: the callback must not call it, not even to restore."""
    from lightning_rnnviz.pipeline import worker as pipeline

    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    seen = []
    report = pipeline.one_thread

    @contextlib.contextmanager
    def watched():
        with report():
            seen.append(torch.get_num_threads())
            yield

    monkeypatch.setattr("lightning_rnnviz.callbacks.rnnviz.one_thread", watched)
    before = torch.get_num_threads()
    trainer = _trainer(tmp_path, [RNNViz(every_n_steps=1, validation=False)], max_epochs=1)
    trainer.fit(TinySeqModel(), loader())
    assert calls == []
    assert torch.get_num_threads() == before
    assert seen  # the reductions ran inside it, on one thread where the OpenMP runtime was found
    if pipeline._openmp() is not None and before > 1:
        assert set(seen) == {1}
    else:
        assert set(seen) == {before}


def test_one_thread_restores_the_count_exactly_also_on_error():
    from lightning_rnnviz.pipeline import worker as _shared

    if _shared._openmp() is None:
        pytest.skip("torch does not run on an OpenMP runtime found here")
    before = torch.get_num_threads()
    real = torch.set_num_threads
    try:
        real(3)  # (the test's own setting, not the callback's)
        with pytest.raises(RuntimeError, match="inside"):
            with _shared.one_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 3
    finally:
        real(before)


def test_one_thread_changes_nothing_without_an_openmp_runtime(monkeypatch):
    from lightning_rnnviz.pipeline import worker as _shared

    monkeypatch.setattr(_shared, "_openmp", lambda: None)
    before = torch.get_num_threads()
    with _shared.one_thread():
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


class _RecordsAlive(pl.Callback):
    """After RNNViz: how many of the step's recorded tensors are still alive once it has been reported."""

    def __init__(self) -> None:
        self.made: list[weakref.ref] = []  # filled as each recording block closes
        self.alive: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.made:
            gc.collect()
            self.alive.append(sum(ref() is not None for ref in self.made))
            self.made = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_the_recording_is_let_go_once_reported(tmp_path, monkeypatch):
    """Records stay where the model ran (device memory on a GPU): none outlives the step that reported it."""
    from lightning_rnnviz.probe import Capture

    seen = _RecordsAlive()
    original = Capture.finish

    def finish(self, *args, **kwargs):
        assert self._session.probe.on_device  # the callback reduces where the record lives
        recording = original(self, *args, **kwargs)
        seen.made.extend(weakref.ref(t) for r in recording.rnn().values() for t in (r.hidden, *r.gates.values()))
        return recording

    monkeypatch.setattr(Capture, "finish", finish)
    trainer = _trainer(tmp_path, [RNNViz(every_n_steps=2, validation=False, strict=True), seen], max_epochs=1)
    trainer.fit(TinySeqModel(), loader())
    assert len(seen.alive) >= 2 and not any(seen.alive), seen.alive
    # and the validation batch's, reported on this thread (the worker lets its recordings go itself)
    seen.alive = []
    cb = RNNViz(every_n_steps=100, log_first_step=False, background=False, strict=True)
    trainer = _trainer(tmp_path / "val", [cb, seen], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(TinySeqModel(), loader(), loader())
    assert len(seen.alive) == 1 and not any(seen.alive), seen.alive


def test_the_automatic_placement_follows_the_cores_to_spare(tmp_path, monkeypatch):
    import lightning_rnnviz.callbacks.rnnviz as module

    asked = []
    for spare, placement in ((8, "thread"), (1, "thread"), (0, "inline")):
        monkeypatch.setattr(module, "spare_cores", lambda s=spare, **kw: asked.append(kw) or s)
        cb = RNNViz(validation=False, strict=True)
        _trainer(tmp_path / str(spare), [cb], max_epochs=1).fit(TinySeqModel(), loader())
        assert cb.placement == placement
    assert asked[0] == {"accelerator": False}  # a CPU run: its intra-op threads are what it occupies


def test_spare_cores_count_what_the_training_occupies(monkeypatch):
    """On an accelerator the training thread (torch's intra-op pool sleeps there), on the CPU its intra-op
    threads; the data loader's workers one each."""
    from lightning_rnnviz.pipeline import drawing as background

    monkeypatch.setattr(background, "usable_cpus", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert background.spare_cores(accelerator=True) == 15
    assert background.spare_cores(accelerator=True, loader_workers=4) == 11
    assert background.spare_cores(accelerator=False) == 0
    monkeypatch.setattr(background, "usable_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert background.spare_cores() == 1  # a 2-core run with one intra-op thread: one core to spare


class _DrawsBeforeTheKernel(TinySeqModel):
    """Inter-layer dropout whose masks cannot be replayed: a pre-hook registered at call time (after the
    probe's) draws from the generator before the kernel does."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(3, 8, num_layers=2, dropout=0.3, batch_first=True)

    @staticmethod
    def _draw(module, args) -> None:
        torch.rand(1)

    def forward(self, x):
        handle = self.rnn.register_forward_pre_hook(self._draw)
        try:
            h, _ = self.rnn(x)
        finally:
            handle.remove()
        a, _ = self.attn(h, h, h)
        return self.head(a[:, -1]).squeeze(-1)


@pytest.mark.parametrize("scalars", ["default", "all"])
def test_an_approximate_record_says_so_everywhere(tmp_path, monkeypatch, scalars):
    """The pictures' titles (their payloads' ``exact`` and notes), ``summary.json`` and the ``summary``
    command say so with either choice of scalars; ``scalars="all"`` also writes the ``exact`` flags."""
    import json

    from lightning_rnnviz.render.offline import read_summary, summary_text

    payloads = []
    import lightning_rnnviz.pipeline.fanout as fanout

    original = fanout.Fanout.picture
    monkeypatch.setattr(fanout.Fanout, "picture", lambda self, job: payloads.append(job) or original(self, job))
    cb = RNNViz(validation=False, strict=True, scalars=scalars)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    with pytest.warns(RNNVizWarning, match=r"the record of 'rnn' is approximate: The inter-layer dropout replay "
                                           r"\(p=0.3\) did not give the module's output bit for bit") as caught:
        trainer.fit(_DrawsBeforeTheKernel(), loader())
    assert sum("is approximate" in str(w.message) for w in caught) == 1  # once per module
    acc = _events(trainer)
    if scalars == "all":
        for quantity in ("hidden", "gates", "grad_norm"):
            assert [e.value for e in acc.Scalars(f"rnnviz/{quantity}/rnn/exact")] == [0.0, 0.0]
        assert [e.value for e in acc.Scalars("rnnviz/attention/attn/exact")] == [1.0, 1.0]
    else:
        assert not [t for t in acc.Tags()["scalars"] if t.endswith("/exact")]
    summary = json.loads((Path(trainer.logger.log_dir) / "rnnviz" / "summary.json").read_text())
    epoch = summary["modules"]["rnn"]["epochs"]["0"]
    assert epoch["exact"] is False and "bit for bit" in epoch["notes"][0]
    assert summary["modules"]["attn"]["epochs"]["0"]["exact"] is True
    assert "notes" not in summary["modules"]["attn"]["epochs"]["0"]
    text = summary_text(read_summary(trainer.logger.log_dir))
    assert "  shows an approximate record (The inter-layer dropout replay (p=0.3)" in text
    rnn_jobs = [j for j in payloads if j.tag.endswith("/rnn")]
    assert {j.kind for j in rnn_jobs} == {"hidden", "gates", "grad_norm", "grad_decay"}
    assert all(not j.payload["exact"] and "bit for bit" in j.payload["notes"][0] for j in rnn_jobs)


@pytest.mark.parametrize("background", [False, "thread"])  # the training thread, or the recording worker
def test_what_a_recordings_scalars_cannot_hold_is_counted_too(tmp_path, monkeypatch, background):
    """The ``rnnviz/overhead/*`` scalars are written, and the loggers flushed, after what they measure:
    that time goes to the budget's cost of each recording and to ``fit_overhead_ms["flushes"]``."""
    from lightning_rnnviz.pipeline.recorder import Recorder

    costs = []  # each recording's cost to the training thread as the budget is told (in training, at its end)
    deliver, finish_inline = Recorder.deliver, Recorder.finish_inline

    def delivered(self, *args):
        spent = deliver(self, *args)
        costs.extend(seconds for seconds, recording in spent if recording)
        return spent

    def finished(self, *args):
        costs.append(finish_inline(self, *args))
        return costs[-1]

    monkeypatch.setattr(Recorder, "deliver", delivered)
    monkeypatch.setattr(Recorder, "finish_inline", finished)
    cb = RNNViz(validation=False, background=background, strict=True, scalars="all")
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(TinySeqModel(), loader())
    logged = [e.value / 1e3 for e in _events(trainer).Scalars("rnnviz/overhead/train_thread_ms")]
    assert len(logged) == len(costs) == 2  # steps 0 and 2
    assert all(cost > seconds for cost, seconds in zip(costs, logged)), (costs, logged)
    # in training (the worker's deliveries may all come at fit end, whose time is fit_overhead_ms["end"])
    flushes = cb.fit_overhead_ms["flushes"]
    assert (0 <= flushes if background else 0 < flushes) and flushes < 1e3 * sum(costs)


@pytest.mark.parametrize(("background", "scalars"), [(False, "all"), ("thread", "all"), ("thread", "default")])
def test_a_budget_spaces_recordings_out_on_lightnings_steps_and_says_so(tmp_path, caplog, monkeypatch, background,
                                                                          scalars):
    """A recording that costs the training thread far more than 1 % of the steps: with
    `budget=0.01` the recordings thin out to multiples of `every_n_steps`, one console line says so, and
    the cadence in use is kept in `cadence` (and logged with `scalars="all"`); `budget=None` (the default)
    records every step. The console line does not depend on the overhead scalars."""
    import logging

    caplog.set_level(logging.INFO)
    # a recording that costs the training thread a second more than measured: far past 1 % of any step on
    # either route, whatever the machine does meanwhile (the worker's own cost is below a millisecond)
    spend = RNNViz._spend
    monkeypatch.setattr(RNNViz, "_spend", lambda self, trainer, seconds, recording: spend(
        self, trainer, seconds + (1.0 if recording else 0.0), recording))
    runs = {}
    for budget in (None, 0.01):
        cb = RNNViz(every_n_steps=2, log_first_step=True, validation=False, histograms=False, budget=budget,
                    background=background, strict=True, scalars=scalars)
        trainer = _trainer(tmp_path / str(budget), [cb], max_epochs=4)
        trainer.fit(TinySeqModel(), loader(n=64))
        events = _events(trainer)
        recorded = [e.step for e in events.Scalars("rnnviz/grad_norm/rnn/first_norm/layer0")]
        if scalars == "all":
            assert [e.step for e in events.Scalars("rnnviz/overhead/train_thread_ms")] == recorded
            logged = [e.value for e in events.Scalars("rnnviz/overhead/every_n_steps")]
        else:
            assert not [t for t in events.Tags()["scalars"] if t.startswith("rnnviz/overhead/")]
            logged = [2.0]  # not logged: `cadence` holds the last one
        runs[budget] = (recorded, logged, cb.cadence)
    steps, cadence, last = runs[None]
    assert steps == [0] + list(range(1, 32, 2)) and set(cadence) == {2.0} and last == 2
    steps, cadence, last = runs[0.01]
    assert len(steps) < len(runs[None][0]) / 2
    assert all((s + 1) % 2 == 0 for s in steps[1:])  # still on Lightning's logging steps
    assert last > 2 and last % 2 == 0 and all(c % 2 == 0 for c in cadence)  # the cadence in use when recorded
    lines = [r.getMessage() for r in caplog.records if "to stay under 1% of training time" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("budget=None records every 2.")


@pytest.mark.parametrize("budget", [0, 1, 1.5, -0.1, True, "3%"])
def test_budget_must_be_a_share(budget):
    with pytest.raises(ValueError, match="`budget` must be a share"):
        RNNViz(budget=budget)


def test_the_data_loaders_workers_count_against_the_free_cores(tmp_path, monkeypatch):
    """At fit start the loaders are not known: the worker chosen then is taken back at train start when
    their worker processes leave no core free of the training (here: one core free, two loader workers)."""
    import types

    import lightning_rnnviz.callbacks.rnnviz as module

    monkeypatch.setattr(module, "spare_cores", lambda accelerator=False, loader_workers=0: 1 - loader_workers)
    for workers, placement in ((0, "thread"), (2, "inline")):
        monkeypatch.setattr(module, "_loader_workers", lambda trainer, w=workers: w)
        cb = RNNViz(validation=False, strict=True)
        trainer = _trainer(tmp_path / str(workers), [cb], max_epochs=1)
        trainer.fit(TinySeqModel(), loader())
        assert cb.placement == placement
        assert "rnnviz/hidden/rnn" in _events(trainer).Tags()["images"]
    monkeypatch.undo()
    one = types.SimpleNamespace(num_workers=2)
    for found, count in ((one, 2), ([one, one], 4), ({"a": one, "b": types.SimpleNamespace()}, 2),
                         (types.SimpleNamespace(flattened=[one, one, one]), 6)):
        assert module._loader_workers(types.SimpleNamespace(train_dataloader=found)) == count
