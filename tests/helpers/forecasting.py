"""Short real fits of the forecasting libraries' recurrent and attention models, each passed its callbacks the
library's own way, for ``tests/integrations``.

Nine models: pytorch-forecasting's ``DeepAR``, ``RecurrentNetwork`` and ``TemporalFusionTransformer``
(``lightning.pytorch``; a ``TimeSeriesDataSet`` of several series with ``min_encoder_length <
max_encoder_length``, so batches mix encoder lengths), darts' ``RNNModel`` (LSTM), ``BlockRNNModel`` (LSTM) and
``TFTModel`` (``pytorch_lightning``; ``pl_trainer_kwargs={"callbacks": [...]}`` and ``log_tensorboard=True``),
neuralforecast's ``LSTM``, ``GRU`` and ``TFT`` (``pytorch_lightning``; ``callbacks=``, ``logger=`` and
``max_steps=`` as model arguments, handed to the Trainer by the library). Each fit takes a few seconds on one
CPU core: hidden sizes 8, 6 optimizer steps, seeds fixed the library's way (``seed_everything`` for
pytorch-forecasting, ``random_state`` for darts, ``random_seed`` for neuralforecast), one validation batch.

The libraries are imported inside the builders only: this module imports without any of them.
``build(name, callbacks, save_dir)`` runs one fit; :data:`MODELS` says, for each, which library it needs and
which of its modules a recording should show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEPS = 6  # optimizer steps of every fit: 2 epochs of 3 batches (neuralforecast: 6 epochs of 1 batch)
HIDDEN = 8
HEADS = 2  # attention heads of the TFTs
SEED = 0


@dataclass
class Fitted:
    """What one fit left: the trained LightningModule, the library's own object around it (its model, or
    ``NeuralForecast``), and the TensorBoard logger's ``log_dir`` (our run is ``<log_dir>/rnnviz``)."""

    module: torch.nn.Module
    owner: Any
    log_dir: Path
    global_step: int

    def weights(self) -> dict[str, torch.Tensor]:
        """Every ``state_dict`` entry, detached and cloned."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


@dataclass(frozen=True)
class Model:
    """One model of a library: the builder, the package it needs, and the modules a recording shows."""

    library: str  # the import name, for pytest.importorskip
    build: Callable[[list, Path], Fitted]
    recurrent: tuple[str, ...]  # qualified names of its nn.LSTM / nn.GRU (subclasses included)
    attention: tuple[str, ...] = ()  # its attention modules (the libraries' own classes)
    # RNNViz warnings a fit of this model gives today, as regular expressions (see the test file)
    expected_warnings: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- pytorch-forecasting


def _pf_datasets():
    import pandas as pd
    from pytorch_forecasting import TimeSeriesDataSet

    rng = np.random.default_rng(SEED)
    frames = []
    for s in range(4):
        t = np.arange(40)
        y = np.sin(t / 4 + s) + 0.1 * rng.standard_normal(t.size) + s
        frames.append(pd.DataFrame({"series": str(s), "time_idx": t, "value": y.astype("float32")}))
    df = pd.concat(frames, ignore_index=True)
    train = TimeSeriesDataSet(
        df[df.time_idx < 32], time_idx="time_idx", target="value", group_ids=["series"],
        min_encoder_length=4, max_encoder_length=12, max_prediction_length=4,
        static_categoricals=["series"], time_varying_known_reals=["time_idx"],
        time_varying_unknown_reals=["value"],
    )
    val = TimeSeriesDataSet.from_dataset(train, df, predict=True, stop_randomization=True)
    return train, val


def _pf_fit(make_model: Callable, callbacks: list, save_dir: Path, name: str) -> Fitted:
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(SEED, verbose=False)
    train, val = _pf_datasets()
    model = make_model(train)
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=STEPS // 2, limit_val_batches=1, log_every_n_steps=1,
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
        logger=TensorBoardLogger(save_dir, name=name), callbacks=callbacks,
    )
    trainer.fit(
        model,
        train_dataloaders=train.to_dataloader(train=True, batch_size=8, num_workers=0),
        val_dataloaders=val.to_dataloader(train=False, batch_size=8, num_workers=0),
    )
    return Fitted(model, model, Path(trainer.logger.log_dir), trainer.global_step)


def fit_pf_deepar(callbacks: list, save_dir: Path) -> Fitted:
    from pytorch_forecasting import DeepAR
    from pytorch_forecasting.metrics import NormalDistributionLoss

    return _pf_fit(
        lambda ds: DeepAR.from_dataset(ds, hidden_size=HIDDEN, rnn_layers=2, loss=NormalDistributionLoss()),
        callbacks, save_dir, "deepar",
    )


def fit_pf_recurrent(callbacks: list, save_dir: Path) -> Fitted:
    from pytorch_forecasting import RecurrentNetwork

    return _pf_fit(
        lambda ds: RecurrentNetwork.from_dataset(ds, cell_type="GRU", hidden_size=HIDDEN, rnn_layers=2),
        callbacks, save_dir, "recurrent",
    )


def fit_pf_tft(callbacks: list, save_dir: Path) -> Fitted:
    from pytorch_forecasting import TemporalFusionTransformer

    return _pf_fit(
        lambda ds: TemporalFusionTransformer.from_dataset(
            ds, hidden_size=HIDDEN, attention_head_size=HEADS, hidden_continuous_size=4,
        ),
        callbacks, save_dir, "tft",
    )


# --------------------------------------------------------------------------- darts


def _darts_series():
    from darts import TimeSeries

    rng = np.random.default_rng(SEED)
    out = []
    for s in range(3):
        t = np.arange(48)
        out.append(TimeSeries.from_values((np.sin(t / 4 + s) + 0.1 * rng.standard_normal(t.size)).astype("float32")))
    return out


def _darts_fit(cls, callbacks: list, save_dir: Path, name: str, **model_kwargs) -> Fitted:
    model = cls(
        **model_kwargs, batch_size=8, n_epochs=2, random_state=SEED,
        work_dir=str(save_dir), model_name=name, log_tensorboard=True, force_reset=True,
        pl_trainer_kwargs={
            "callbacks": callbacks, "accelerator": "cpu", "devices": 1, "limit_train_batches": STEPS // 2,
            "limit_val_batches": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    )
    series = _darts_series()
    # darts pins memory by default, which warns on a machine without an accelerator
    model.fit(series, val_series=series, dataloader_kwargs={"pin_memory": False})
    return Fitted(model.model, model, Path(model.trainer.logger.log_dir), model.trainer.global_step)


def fit_darts_rnn(callbacks: list, save_dir: Path) -> Fitted:
    from darts.models import RNNModel

    return _darts_fit(RNNModel, callbacks, save_dir, "rnn", input_chunk_length=8, model="LSTM",
                      hidden_dim=HIDDEN, n_rnn_layers=2, dropout=0.1, training_length=12)


def fit_darts_block_rnn(callbacks: list, save_dir: Path) -> Fitted:
    from darts.models import BlockRNNModel

    return _darts_fit(BlockRNNModel, callbacks, save_dir, "block_rnn", input_chunk_length=8,
                      output_chunk_length=4, model="LSTM", hidden_dim=HIDDEN, n_rnn_layers=2, dropout=0.1)


def fit_darts_tft(callbacks: list, save_dir: Path) -> Fitted:
    from darts.models import TFTModel

    return _darts_fit(TFTModel, callbacks, save_dir, "tft", input_chunk_length=8, output_chunk_length=4,
                      hidden_size=HIDDEN, num_attention_heads=HEADS, hidden_continuous_size=4,
                      add_relative_index=True)


# --------------------------------------------------------------------------- neuralforecast


def _nf_frame():
    import pandas as pd

    rng = np.random.default_rng(SEED)
    frames = []
    for s in range(3):
        t = np.arange(48)
        y = np.sin(t / 4 + s) + 0.1 * rng.standard_normal(t.size)
        frames.append(pd.DataFrame({"unique_id": f"s{s}", "ds": t, "y": y.astype("float32")}))
    return pd.concat(frames, ignore_index=True)


def _nf_fit(cls, callbacks: list, save_dir: Path, name: str, **model_kwargs) -> Fitted:
    from neuralforecast import NeuralForecast
    from pytorch_lightning.loggers import TensorBoardLogger

    model = cls(
        **model_kwargs, h=4, input_size=12, max_steps=STEPS, val_check_steps=STEPS // 2, batch_size=3,
        windows_batch_size=16, random_seed=SEED,
        # passed through to the Trainer by neuralforecast
        callbacks=callbacks, logger=TensorBoardLogger(save_dir, name=name), accelerator="cpu", devices=1,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
    )
    nf = NeuralForecast(models=[model], freq=1)
    nf.fit(_nf_frame(), val_size=8)
    fitted = nf.models[0]  # NeuralForecast fits deep copies of the models it is given
    logger = fitted.trainer_kwargs["logger"]
    return Fitted(fitted, nf, Path(logger.log_dir), STEPS)


def fit_nf_lstm(callbacks: list, save_dir: Path) -> Fitted:
    from neuralforecast.models import LSTM

    return _nf_fit(LSTM, callbacks, save_dir, "lstm", encoder_hidden_size=HIDDEN, encoder_n_layers=2,
                   decoder_hidden_size=HIDDEN)


def fit_nf_gru(callbacks: list, save_dir: Path) -> Fitted:
    from neuralforecast.models import GRU

    return _nf_fit(GRU, callbacks, save_dir, "gru", encoder_hidden_size=HIDDEN, encoder_n_layers=2,
                   decoder_hidden_size=HIDDEN)


def fit_nf_tft(callbacks: list, save_dir: Path) -> Fitted:
    from neuralforecast.models import TFT

    return _nf_fit(TFT, callbacks, save_dir, "tft", hidden_size=HIDDEN, n_head=HEADS)


# --------------------------------------------------------------------------- the table

MODELS: dict[str, Model] = {
    "pf_deepar": Model("pytorch_forecasting", fit_pf_deepar, ("rnn",)),
    "pf_recurrent": Model("pytorch_forecasting", fit_pf_recurrent, ("rnn",)),
    "pf_tft": Model("pytorch_forecasting", fit_pf_tft, ("lstm_encoder", "lstm_decoder"), ("multihead_attn",)),
    "darts_rnn": Model("darts", fit_darts_rnn, ("rnn",)),
    "darts_block_rnn": Model("darts", fit_darts_block_rnn, ("rnn",)),
    "darts_tft": Model("darts", fit_darts_tft, ("lstm_encoder", "lstm_decoder"), ("multihead_attn",)),
    "nf_lstm": Model("neuralforecast", fit_nf_lstm, ("hist_encoder",)),
    "nf_gru": Model("neuralforecast", fit_nf_gru, ("hist_encoder",)),
    "nf_tft": Model(
        "neuralforecast", fit_nf_tft,
        ("temporal_encoder.history_encoder", "temporal_encoder.future_encoder"),
        ("temporal_fusion_decoder.attention",),
    ),
}


def build(name: str, callbacks: list, save_dir: str | Path) -> Fitted:
    """Fit model ``name`` of :data:`MODELS` with ``callbacks``, logging to TensorBoard under ``save_dir``."""
    return MODELS[name].build(list(callbacks), Path(save_dir))
