"""Saving and copying the callback: a pickle holds its constructor arguments only (a safe loader needs only
the class allow-listed), a lambda argument is named when saving fails, a copy reports to the original, and
the no-logger warning names the switch of the library that made the model."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from lightning_rnnviz import GradientNormMonitor, HiddenStateMonitor, RNNViz, RNNVizWarning
from lightning_rnnviz.callbacks.rnnviz import _logger_hint
from lightning_rnnviz.render.findings import Finding
from tests.helpers.models import TinySeqModel, loader
from tests.helpers.namespace import Callback, TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings("ignore:.*val_dataloader.*", "ignore:.*log_every_n_steps.*")
RNNVIZ = "lightning_rnnviz.callbacks.rnnviz.RNNViz"


def token_labels(batch) -> list[str]:
    """An importable ``labels`` function."""
    return [f"t{i}" for i in range(batch[0].shape[1])]


def first_output(module, args, output):
    """An importable attention extractor."""
    return output[1]


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _globals(blob: bytes) -> set[str]:
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(blob)))


def _trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    defaults = {"max_epochs": 1, "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, "logger": TensorBoardLogger(tmp_path, name="tb"), "callbacks": callbacks,
                "num_sanity_val_steps": 0}
    return pl.Trainer(**{**defaults, **kwargs})


# --- pickling ---------------------------------------------------------------------------------------
def test_a_pickle_holds_the_constructor_arguments_and_loads_with_only_the_class_allow_listed():
    cb = RNNViz(3, modules="rnn*", attention={"attn": first_output}, labels=token_labels, max_samples=4,
                renderer="matplotlib", budget=0.05)
    state = cb.__getstate__()
    assert state == {"every_n_steps": 3, "modules": ["rnn*"], "attention": {"attn": first_output},
                     "labels": token_labels, "sample": 0, "max_samples": 4, "top_k": 64, "max_heads": 8,
                     "max_time": 256, "histograms": True, "renderer": "matplotlib", "background": True,
                     "validation": True, "log_first_step": True, "call": None, "save_records": False,
                     "save_records_max_mb": 256, "strict": False, "budget": 0.05,
                     "scalars": "default", "probe_set": 8}
    blob = _saved([cb])
    # the class and the user's own functions: nothing of ours beside the class
    assert _globals(blob) == {RNNVIZ, f"{__name__}.token_labels", f"{__name__}.first_output"}
    with pytest.raises(pickle.UnpicklingError, match="RNNViz"):
        torch.load(io.BytesIO(blob), weights_only=True)
    with torch.serialization.safe_globals([RNNViz, token_labels, first_output]):
        (loaded,) = torch.load(io.BytesIO(blob), weights_only=True)
    assert type(loaded) is RNNViz and loaded.__getstate__() == state


def test_a_pickle_leaves_the_results_and_the_run_behind(tmp_path):
    """Pickled in the middle of a fit (darts saves its model at fit start; ``ddp_spawn`` pickles the trainer),
    after results exist: still the arguments only, and a plain allow-list loads it."""
    saved = {}

    class Save(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                saved["blob"] = _saved([c for c in trainer.callbacks if isinstance(c, RNNViz)])

    cb = RNNViz(every_n_steps=1, validation=False, histograms=False, background=False)
    cb._reporter.findings.append(Finding("vanishing_gradient", "rnn", 0, 3.0, 12.0, "earlier"))
    trainer = _trainer(tmp_path, [cb, Save()])
    trainer.fit(TinySeqModel(), loader())
    assert _globals(saved["blob"]) == {RNNVIZ}
    with torch.serialization.safe_globals([RNNViz]):
        (loaded,) = torch.load(io.BytesIO(saved["blob"]), weights_only=True)
    assert loaded.findings == [] and loaded.placement is None and not loaded.enabled
    assert loaded.__getstate__() == cb.__getstate__()
    assert cb.findings[0].message == "earlier" and cb.placement == "inline"  # the original keeps its own


def test_a_pickle_keeps_the_settings_changed_after_construction_and_what_a_subclass_added():
    class Tagged(HiddenStateMonitor):
        def __init__(self, tag: str, **kwargs) -> None:
            super().__init__(**kwargs)
            self.tag = tag

    cb = HiddenStateMonitor(every_n_steps=2)
    cb.every_n_steps = 7
    assert pickle.loads(pickle.dumps(cb)).every_n_steps == 7
    tagged = Tagged("mine", top_k=5)  # a local class, not picklable by name: the state's round trip
    twin = Tagged.__new__(Tagged)
    twin.__setstate__(tagged.__getstate__())
    assert (twin.tag, twin.top_k, twin.quantities) == ("mine", 5, ("hidden",))


@pytest.mark.parametrize(("arguments", "named"), [
    ({"labels": lambda batch: []}, "its `labels` argument is a lambda"),
    ({"attention": {"decoder.attn": lambda m, a, o: o[1]}}, "its `attention` argument's entry 'decoder.attn' is a lambda"),
])
def test_saving_a_lambda_names_the_argument_and_the_fix(arguments, named):
    cb = RNNViz(**arguments)
    for save in (pickle.dumps, _saved):
        with pytest.raises(pickle.PicklingError, match=named) as caught:
            save(cb)
        assert "at the top level of a module" in str(caught.value)
    copy.deepcopy(cb)  # a copy is not a pickle


def test_saving_a_local_function_names_it():
    def local_labels(batch):
        return []

    with pytest.raises(pickle.PicklingError, match=r"`labels` argument is the local function '.*local_labels'"):
        pickle.dumps(RNNViz(labels=local_labels))


def test_a_pickle_of_the_whole_state_by_an_earlier_version_still_loads():
    cb = RNNViz(every_n_steps=4)
    whole = {k: v for k, v in cb.__dict__.items() if k != "_results"}
    whole.update(placement="thread", stride=2, cadence=8, drawer_peak_rss_mb=None, fit_overhead_ms={"start": 1.0})
    twin = RNNViz.__new__(RNNViz)
    twin.__setstate__(whole)
    assert (twin.every_n_steps, twin.placement, twin.cadence, twin.fit_overhead_ms) == (4, "thread", 8, {"start": 1.0})
    assert twin.findings == [] and twin.__getstate__() == cb.__getstate__()


# --- copies ---------------------------------------------------------------------------------------
def test_a_copy_reports_to_the_original(tmp_path):
    """Libraries that copy the callbacks they are given (neuralforecast) train with the copy: the object the
    user holds shows the copy's results."""
    original = GradientNormMonitor(every_n_steps=1, validation=False, background=False)
    models = {"callbacks": [original]}
    copied = copy.deepcopy(models)["callbacks"][0]
    assert copied is not original and type(copied) is GradientNormMonitor
    assert copied.__getstate__() == original.__getstate__()
    trainer = _trainer(tmp_path, [copied], max_epochs=2)
    trainer.fit(TinySeqModel(), loader())
    assert copied.enabled is False and original.enabled is False
    assert sorted(original.decay_history["rnn"]) == [0, 1]
    assert original.decay_history is copied.decay_history and original.findings is copied.findings
    assert original.error_counts is copied.error_counts
    assert original.placement == "inline" and original.cadence == 1
    assert set(original.fit_overhead_ms) == {"start", "flushes", "end"}
    assert original.state_dict()["decay_history"].keys() == {"rnn"}
    # a copy of the copy, and a shallow copy, report to the same place; a pickle of any holds the arguments
    for other in (copy.deepcopy(copied), copy.copy(original)):
        assert other.decay_history is original.decay_history
        assert other.__getstate__() == original.__getstate__()


def test_a_copy_has_its_own_run_state():
    original = RNNViz(modules=["rnn"], attention={"attn": first_output})
    copied = copy.deepcopy(original)
    assert copied.modules == ["rnn"] and copied.modules is not original.modules
    assert copied.attention["attn"] is first_output
    copied.enabled = True
    copied._recorder = object()
    assert original.enabled is False and original._recorder is None


# --- no logger ----------------------------------------------------------------------------------------
def _library_model(module: str) -> type:
    """A model class defined, as far as its ``__module__`` says, in ``module`` (the library is not imported)."""
    return type("LibraryModel", (TinySeqModel,), {"__module__": module})


@pytest.mark.parametrize(("module", "hint"), [
    ("darts.models.forecasting.rnn_model", "pass `log_tensorboard=True` to the model"),
    ("neuralforecast.models.lstm", "`LSTM(..., logger=TensorBoardLogger(...))`"),
    ("my_project.models", "Pass `logger=TensorBoardLogger(...)`"),
])
def test_no_logger_names_the_switch_of_the_models_library(tmp_path, module, hint):
    model = _library_model(module)()
    assert hint in _logger_hint(model)
    trainer = _trainer(tmp_path, [RNNViz()], logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader())
    ours = [str(w.message) for w in caught if issubclass(w.category, RNNVizWarning)]
    assert len(ours) == 1 and "no logger" in ours[0] and hint in ours[0], ours
