"""The callback's warnings come from Lightning's hooks and from the recording worker, where no frame is the
user's: they point at the user's ``LightningModule`` class (or the user's class of the module they name),
here the classes of this file."""

from __future__ import annotations

import gc
import inspect
import warnings

import pytest
from torch import nn

from lightning_rnnviz import AttentionMonitor, RNNViz, RNNVizWarning
from lightning_rnnviz.probe import held
from lightning_rnnviz.render.report import Guard
from tests.helpers.models import TinySeqModel, loader
from tests.helpers.namespace import TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
    "ignore:.*val_dataloader.*",
)


class NaNModel(TinySeqModel):
    def training_step(self, batch, batch_idx):
        x, y = batch
        h, _ = self.rnn(x)
        return (h * float("nan")).sum() * 0.0 + nn.functional.mse_loss(self.head(h[:, -1]).squeeze(-1), y)


class RNNOnly(TinySeqModel):
    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


def _fit(tmp_path, model, callback):
    trainer = pl.Trainer(max_epochs=1, log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, logger=TensorBoardLogger(tmp_path, name="w"),
                         callbacks=[callback], num_sanity_val_steps=0, limit_train_batches=2)
    trainer.fit(model, loader())


def _at(caught, match: str) -> list[tuple[str, int]]:
    return [(w.filename, w.lineno) for w in caught if issubclass(w.category, RNNVizWarning) and match in str(w.message)]


@pytest.mark.parametrize("background", ["thread", False])
def test_a_warning_from_the_worker_or_a_hook_points_at_the_lightning_module(tmp_path, background):
    cb = RNNViz(every_n_steps=1, background=background, validation=False, histograms=False)
    with pytest.warns(RNNVizWarning, match="NaN/Inf") as caught:
        _fit(tmp_path, NaNModel(), cb)
    # about the LSTM 'rnn', PyTorch's class: the user's class that holds it
    assert _at(caught, "NaN/Inf") == [(__file__, inspect.getsourcelines(NaNModel)[1])]


def test_a_callback_that_does_nothing_points_at_the_lightning_module(tmp_path):
    model = RNNOnly()
    del model.attn
    with pytest.warns(RNNVizWarning, match="no module to watch") as caught:
        _fit(tmp_path, model, AttentionMonitor())
    assert _at(caught, "no module to watch") == [(__file__, inspect.getsourcelines(RNNOnly)[1])]


def test_the_guard_points_at_the_module_named_and_keeps_no_model_alive():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(2, 3)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()

    guard = Guard("RNNViz", category=RNNVizWarning)
    model = Model()
    guard.locate = held.locator(model)
    with pytest.warns(RNNVizWarning) as caught:
        assert guard.once("a", "about encoder.rnn", module="encoder.rnn")
        assert not guard.once("a", "about encoder.rnn again", module="encoder.rnn")  # once per key
        guard.once("b", "about the model")
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, inspect.getsourcelines(Encoder)[1]),
                                                         (__file__, inspect.getsourcelines(Model)[1])]
    del model
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.once("c", "model gone")  # points where `warnings.warn` would
    assert caught[0].filename != __file__ or caught[0].lineno != inspect.getsourcelines(Model)[1]
