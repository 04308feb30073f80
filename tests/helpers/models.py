"""Tiny Lightning models for callback tests: a 2-layer LSTM with self-attention, and a model without RNNs."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn


class TinySeqModel(pl.LightningModule):
    """LSTM (2 layers) -> MultiheadAttention -> linear head, regression on the sum of the sequence."""

    def __init__(self, lr: float = 1e-2, hidden: int = 8, fail_at: int | None = None) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, hidden, num_layers=2, batch_first=True)
        self.attn = nn.MultiheadAttention(hidden, 2, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        self.lr = lr
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        a, _ = self.attn(h, h, h)
        return self.head(a[:, -1]).squeeze(-1)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NoRNNModel(TinySeqModel):
    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.head = nn.Linear(3, 1)
        self.lr = 1e-2
        self.fail_at = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1]).squeeze(-1)


def loader(n: int = 32, steps: int = 6, batch_size: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, 3, generator=gen)
    y = x.sum((1, 2)) / 4
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
