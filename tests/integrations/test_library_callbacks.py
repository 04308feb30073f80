"""``RNNViz`` where the forecasting libraries keep the callbacks they are given: darts pickles them into the
model file and loads them back with a restricted unpickler (only ``RNNViz`` allow-listed is enough), and
without its ``log_tensorboard=True`` the callback gives one warning that names it; neuralforecast deep-copies
them (the object the user holds shows the copy's findings).

Each test skips where its library is not installed (CI installs them: ``.[test,forecast]``).
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_rnnviz import RNNViz, RNNVizWarning

pytestmark = pytest.mark.slow
RNNVIZ = "lightning_rnnviz.callbacks.rnnviz.RNNViz"


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny models: one intra-op thread is faster and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rnnviz_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RNNVizWarning)]


# --------------------------------------------------------------------------- darts
def _darts_model(save_dir: Path, callbacks: list, epochs: int = 2, **kwargs):
    from darts.models import RNNModel

    return RNNModel(
        model="LSTM", input_chunk_length=8, training_length=12, hidden_dim=8, n_rnn_layers=1, batch_size=8,
        n_epochs=epochs, random_state=0, work_dir=str(save_dir), model_name="rnn", force_reset=True,
        pl_trainer_kwargs={"callbacks": callbacks, "accelerator": "cpu", "devices": 1, "limit_train_batches": 3,
                           "limit_val_batches": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
                           "enable_model_summary": False},
        **kwargs,
    )


def _darts_fit(model) -> None:
    from darts import TimeSeries

    series = TimeSeries.from_values(np.sin(np.arange(60) / 4).astype("float32"))
    # darts pins memory by default, which warns on a machine without an accelerator
    model.fit(series, val_series=series, dataloader_kwargs={"pin_memory": False})


def _load_darts(path: str, allowed: list):
    from darts.models import RNNModel
    from darts.utils.serialization import safe_globals

    with safe_globals(allowed):
        return RNNModel.load(path)


def _restored(model) -> RNNViz:
    (restored,) = [c for c in model.trainer_params["callbacks"] if isinstance(c, RNNViz)]
    return restored


def test_darts_default_warns_once_with_its_switch_and_loads_with_only_rnnviz_allow_listed(tmp_path):
    """darts' defaults: no logger (``log_tensorboard=False``), and its safe loader for the model file."""
    pytest.importorskip("darts")
    from darts.utils.serialization.base import UnpicklingError

    callback = RNNViz(every_n_steps=1, validation=False)
    model = _darts_model(tmp_path, [callback], epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RNNVizWarning)
        _darts_fit(model)
    ours = _rnnviz_warnings(caught)
    assert len(ours) == 1, ours
    assert "no logger" in ours[0] and "pass `log_tensorboard=True` to the model" in ours[0]

    path = str(tmp_path / "model.pt")
    model.save(path)
    ours = {g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if "lightning_rnnviz" in g}
    assert ours == {RNNVIZ}  # none of our internal classes: the constructor arguments only
    with pytest.raises(UnpicklingError, match=RNNVIZ.replace(".", r"\.")):
        _load_darts(path, [])
    restored = _restored(_load_darts(path, [RNNViz]))
    assert restored is not callback and restored.__getstate__() == callback.__getstate__()


def test_darts_model_that_ran_the_callback_saves_its_arguments_only(tmp_path):
    """With ``log_tensorboard=True`` the callback runs (a healthy LSTM: no finding); the saved file holds its
    arguments, not its results. (darts 0.48's safe loader refuses the file for darts' own reasons: it pickles
    its ``TensorBoardLogger`` there, which it does not allow; hence ``trusted=True`` here.)"""
    pytest.importorskip("darts")
    from darts.models import RNNModel

    callback = RNNViz(every_n_steps=1, validation=False, histograms=False)
    model = _darts_model(tmp_path, [callback], log_tensorboard=True)
    _darts_fit(model)
    assert sorted(callback.decay_history["rnn"]) == [0, 1]  # darts trains with the object it was given
    assert callback.findings == [], [(f.kind, f.where, f.value) for f in callback.findings]

    path = str(tmp_path / "model.pt")
    model.save(path)
    ours = {g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if "lightning_rnnviz" in g}
    assert ours == {RNNVIZ}
    restored = _restored(RNNModel.load(path, trusted=True))
    assert restored.__getstate__() == callback.__getstate__()
    assert restored.findings == [] and restored.decay_history == {} and restored.placement is None


def test_darts_save_names_a_lambda_argument(tmp_path):
    pytest.importorskip("darts")
    model = _darts_model(tmp_path, [RNNViz(labels=lambda batch: [])])
    with pytest.raises(pickle.PicklingError, match=r"its `labels` argument is a lambda.*top level of a module"):
        model.save(str(tmp_path / "model.pt"))


# --------------------------------------------------------------------------- neuralforecast
def test_neuralforecast_copy_reports_its_findings_to_the_callback_the_user_holds(tmp_path, caplog):
    """neuralforecast fits deep copies of its models, their callbacks with them. An LSTM whose forget gate is
    shut (bias -12) gives findings (the gate, and the gradient that vanishes behind it): printed on the
    console, and in the ``findings`` of the object the user holds. Its epochs are one batch each, so a
    finding must hold at four of them (four recordings) before it is reported."""
    pytest.importorskip("neuralforecast")
    import pandas as pd
    from neuralforecast import NeuralForecast
    from neuralforecast.models import LSTM
    from pytorch_lightning.loggers import TensorBoardLogger

    hidden = 8
    callback = RNNViz(every_n_steps=1, validation=False, histograms=False)
    model = LSTM(h=4, input_size=12, max_steps=4, val_check_steps=4, batch_size=2, encoder_hidden_size=hidden, encoder_n_layers=1,
                 decoder_hidden_size=hidden, random_seed=0, callbacks=[callback],
                 logger=TensorBoardLogger(tmp_path, name="lstm"), accelerator="cpu", devices=1,
                 log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    with torch.no_grad():
        model.hist_encoder.bias_ih_l0[hidden : 2 * hidden] = -12.0
    frame = pd.DataFrame({"unique_id": "s0", "ds": np.arange(48), "y": np.sin(np.arange(48) / 4).astype("float32")})
    caplog.set_level(logging.INFO)
    forecast = NeuralForecast(models=[model], freq=1)
    forecast.fit(frame)

    (ran,) = [c for c in forecast.models[0].trainer_kwargs["callbacks"] if isinstance(c, RNNViz)]
    assert ran is not callback  # what neuralforecast trained with is a copy
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning_rnnviz: epoch")]
    assert ("gate_saturated", "hist_encoder", "forget") in {(f.kind, f.module, f.gate) for f in callback.findings}
    # every line printed is a finding the held object has (one line when a finding appears)
    assert len(printed) == len({f.key for f in callback.findings}), (printed, callback.findings)
    assert all(any(f"{f.kind} in {f.module!r}" in line for f in callback.findings) for line in printed), printed
    assert callback.findings is ran.findings and sorted(callback.decay_history["hist_encoder"]) == [0, 1, 2, 3]
    assert callback.placement is not None and callback.error_counts == {}
