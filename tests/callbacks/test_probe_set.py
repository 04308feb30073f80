"""``RNNViz(probe_set=...)`` (issue 25): every training and validation recording of a real fit writes one probe
set to our TensorBoard run, which TensorBoard's reader sees as data of the ``rnnviz`` plugin and which decodes
to what a ``Probe`` records of the same batch."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rnnviz import Probe, RNNViz
from lightning_rnnviz.payload import unpack
from lightning_rnnviz.sinks import run_dir
from tests.helpers.models import TinySeqModel
from tests.helpers.namespace import CSVLogger, TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
    "ignore:.*no `val_dataloader`.*",
)
TRAIN, VAL = "rnnviz/probe_set/train", "rnnviz/probe_set/val"
STEPS = 6


def row_labels(batch, row=0):
    """Tokens per row: called as ``labels(batch)`` for the pictures and ``labels(batch, row)`` per probe row."""
    return [f"r{row}t{t}" for t in range(STEPS)]


def batch_labels(batch):
    return [f"s{t}" for t in range(STEPS)]


def _fit(tmp_path: Path, **callback) -> tuple[pl.Trainer, TinySeqModel, torch.Tensor]:
    torch.manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.randn(24, STEPS, 3), torch.randn(24))
    val_x = torch.randn(8, STEPS, 3)
    val = torch.utils.data.TensorDataset(val_x, torch.randn(8))
    cb = RNNViz(strict=True, **callback)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[cb],
                         logger=[TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")])
    model = TinySeqModel()
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=8), torch.utils.data.DataLoader(val, batch_size=8))
    return trainer, model, val_x


def _read(trainer: pl.Trainer) -> EventAccumulator:
    acc = EventAccumulator(run_dir(trainer.loggers[0].log_dir), size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("background", [False, "thread"])
def test_a_fit_writes_a_probe_set_per_recording_that_decodes_to_the_records_values(tmp_path, background):
    trainer, model, val_x = _fit(tmp_path, background=background, labels=row_labels)
    acc = _read(trainer)
    assert {TRAIN, VAL} <= set(acc.Tags()["tensors"])
    for tag in (TRAIN, VAL):
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "rnnviz"
    # one per recording: the training steps of the statistics, and each validation (one per epoch)
    train_steps = [e.step for e in acc.Tensors(TRAIN)]
    assert train_steps == [e.step for e in acc.Scalars("rnnviz/hidden/rnn/mean_abs/layer0")]
    val_steps = [e.step for e in acc.Tensors(VAL)]
    assert len(val_steps) == 2 and val_steps == [e.step for e in acc.Images("rnnviz/val/hidden/rnn")]
    for event in acc.Tensors(TRAIN):
        header, array = unpack(event.tensor_proto.string_val[0])
        assert (header["step"], header["source"], header["rows"]) == (event.step, "training", list(range(8)))
        assert [m["name"] for m in header["modules"]] == ["rnn", "attn"]
        assert header["tokens"] == [row_labels(None, r) for r in range(8)]
        for layer in header["modules"][0]["layers"]:
            norm = array(layer["grad_norm"])
            assert norm.shape == (8, STEPS) and (norm > 0).all() and len(layer["horizon"]) == 8
    # the last validation ran with the trained weights: a Probe of the model on that batch records the same
    header, array = unpack(acc.Tensors(VAL)[-1].tensor_proto.string_val[0])
    assert header["source"] == "validation" and header["lengths"] == [STEPS] * 8
    assert any("no gradients" in n for n in header["notes"])
    model.eval()
    with Probe(model, strict=True).record() as recording, torch.no_grad():
        model(val_x)
    rnn, attn = header["modules"]
    for i, layer in enumerate(rnn["layers"]):
        assert layer["grad_norm"] is None and layer["horizon"] is None
        np.testing.assert_allclose(array(layer["hidden"]), recording["rnn"].hidden[i].numpy(), rtol=1e-6, atol=1e-7)
        for gate, ref in layer["gates"].items():
            np.testing.assert_allclose(array(ref), recording["rnn"].gates[gate][i].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(array(attn["weights"]), recording["attn"].attention.numpy(), rtol=1e-6, atol=1e-7)
    assert attn["tokens_are_steps"] is True
    assert not trainer.callbacks[0].error_counts


def test_rows_by_index_and_a_one_argument_labels_give_only_the_sample_its_tokens(tmp_path):
    trainer, _, _ = _fit(tmp_path, labels=batch_labels, probe_set=[2, 5], sample=5, background=False)
    acc = _read(trainer)
    for tag in (TRAIN, VAL):
        header, array = unpack(acc.Tensors(tag)[-1].tensor_proto.string_val[0])
        assert header["rows"] == [2, 5]
        assert header["tokens"] == [None, batch_labels(None)]
        assert array(header["modules"][0]["layers"][0]["hidden"]).shape == (2, STEPS, 8)


def test_probe_set_none_writes_none(tmp_path):
    trainer, _, _ = _fit(tmp_path, probe_set=None, background=False)
    acc = _read(trainer)
    assert not [t for t in acc.Tags()["tensors"] if t.startswith("rnnviz/probe_set")]
    assert acc.Tags()["scalars"]  # the rest is written


@pytest.mark.parametrize("value, match", [
    (0, "positive"), (-2, "positive"), (True, "positive int"), (2.5, "positive int"), ("8", "positive int"),
    ([], "at least one"), ([1, -1], "non-negative"), ([1, 1], "twice"), ([3, 16], r"rows \[16\].*max_samples=16"),
    ([0, 1.0], "non-negative"),
])
def test_bad_probe_set_values_raise(value, match):
    with pytest.raises(ValueError, match=match):
        RNNViz(probe_set=value)


def test_probe_set_is_capped_by_max_samples_and_kept_by_pickles_and_copies():
    capped = RNNViz(probe_set=20, max_samples=4)
    assert capped._reporter.probe_rows == [0, 1, 2, 3]
    assert any("max_samples=4" in n for n in capped._reporter.probe_notes)
    assert RNNViz()._reporter.probe_rows == list(range(8))
    assert RNNViz(probe_set=None)._reporter.probe_rows is None
    assert RNNViz(probe_set=30, max_samples=None)._reporter.probe_rows == list(range(30))
    cb = RNNViz(probe_set=(1, 3))
    assert cb.__getstate__()["probe_set"] == [1, 3]
    for twin in (pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb), copy.copy(cb)):
        assert twin.probe_set == [1, 3] and twin._reporter.probe_rows == [1, 3]


@pytest.mark.parametrize("background", [False, "thread"])
def test_several_monitors_write_one_probe_set_of_all_their_modules(tmp_path, background):
    """A monitor of the LSTM and one of the attention share each recording: its one probe set shows both
    modules (the first monitor's rows and tokens), not only the first monitor's module."""
    from lightning_rnnviz import AttentionMonitor, HiddenStateMonitor

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, STEPS, 3), torch.randn(24))
    monitors = [HiddenStateMonitor(modules=["rnn"], background=background, strict=True, labels=row_labels),
                AttentionMonitor(modules=["attn"], background=background, strict=True, probe_set=[0, 1])]
    trainer = pl.Trainer(max_epochs=1, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, callbacks=monitors,
                         logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(TinySeqModel(), torch.utils.data.DataLoader(data, batch_size=8))
    sets = _read(trainer).Tensors(TRAIN)
    assert [e.step for e in sets] == [0, 1, 2]
    for event in sets:
        header, _ = unpack(event.tensor_proto.string_val[0])
        assert [m["name"] for m in header["modules"]] == ["rnn", "attn"]
        assert header["rows"] == list(range(8)) and header["tokens"] == [row_labels(None, r) for r in range(8)]
    for monitor in monitors:
        assert not monitor.error_counts
