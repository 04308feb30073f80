"""Tiny Lightning models for callback tests: a 2-layer LSTM with self-attention, and a model without RNNs."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers.namespace import pl


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


class OneRNNModel(TinySeqModel):
    """One recurrent module (``rnn``, an ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` of 8 units) and a linear head on
    its last step: the model of a user's first run, many-to-one as the vanishing-gradients example."""

    def __init__(self, kind: str = "LSTM", lr: float = 0.01) -> None:
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.rnn = getattr(nn, kind)(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.lr = lr
        self.fail_at = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)

    validation_step = pl.LightningModule.validation_step  # none: a fit without validation data is quiet

def loader(n: int = 32, steps: int = 6, batch_size: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, 3, generator=gen)
    y = x.sum((1, 2)) / 4
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


# --- models for tests/callbacks/test_reliability.py ---------------------------------------------------


class VanillaRNNModel(TinySeqModel):
    """``TinySeqModel`` with a 2-layer tanh ``nn.RNN``: runs in bf16/fp16 under CPU autocast (an ``nn.LSTM``
    may not: oneDNN has no reduced-precision LSTM kernel on CPUs without AVX-512)."""

    def __init__(self, lr: float = 1e-2, hidden: int = 8) -> None:
        super().__init__(lr=lr, hidden=hidden)
        self.rnn = nn.RNN(3, hidden, num_layers=2, batch_first=True)


class ProjectedSeqModel(TinySeqModel):
    """Linear input projection -> LSTM -> attention -> head; ``checkpoint`` runs the LSTM under
    ``torch.utils.checkpoint`` (``"reentrant"`` or ``"non_reentrant"``), ``None`` runs it plainly.

    The projection makes the checkpointed block's input require grad, as in a real network.
    """

    def __init__(self, lr: float = 0.0, checkpoint: str | None = None, compile_rnn: bool = False) -> None:
        super().__init__(lr=lr)
        self.proj = nn.Linear(3, 3)
        self.checkpoint = checkpoint
        if compile_rnn:
            self.rnn = torch.compile(self.rnn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)
        if self.checkpoint is None:
            h, _ = self.rnn(z)
        else:
            from torch.utils.checkpoint import checkpoint

            h, _ = checkpoint(self.rnn, z, use_reentrant=self.checkpoint == "reentrant")
        a, _ = self.attn(h, h, h)
        return self.head(a[:, -1]).squeeze(-1)


class ManualTwoOptimizerModel(TinySeqModel):
    """Manual optimization with two optimizers, GAN style: forward, backward and step for the recurrent
    part, then a second forward, backward and step for the head, so ``global_step`` moves twice a batch."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(lr=lr)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_body, opt_head = self.optimizers()
        loss_body = nn.functional.mse_loss(self(x), y)
        opt_body.zero_grad()
        self.manual_backward(loss_body)
        opt_body.step()
        loss_head = nn.functional.mse_loss(self(x), y)
        opt_head.zero_grad()
        self.manual_backward(loss_head)
        opt_head.step()
        self.log("train_loss", loss_head)

    def configure_optimizers(self):
        body = [p for n, p in self.named_parameters() if not n.startswith("head.")]
        return torch.optim.SGD(body, lr=self.lr), torch.optim.SGD(self.head.parameters(), lr=self.lr)


class NoValidationStepModel(TinySeqModel):
    """``TinySeqModel`` without a ``validation_step`` (Lightning skips the validation loop)."""

    validation_step = pl.LightningModule.validation_step


class TwoValLoadersModel(TinySeqModel):
    """Logs ``val_loss/dataloader_idx_<i>`` for two validation dataloaders."""

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))


class ConfigureModelSeqModel(TinySeqModel):
    """``TinySeqModel`` whose LSTM and attention are created in ``configure_model``, not in ``__init__``."""

    def __init__(self, lr: float = 1e-2, hidden: int = 8) -> None:
        pl.LightningModule.__init__(self)
        self.hidden = hidden
        self.rnn: nn.Module | None = None
        self.attn: nn.Module | None = None
        self.head = nn.Linear(hidden, 1)
        self.lr = lr
        self.fail_at = None

    def configure_model(self) -> None:
        if self.rnn is None:
            self.rnn = nn.LSTM(3, self.hidden, num_layers=2, batch_first=True)
            self.attn = nn.MultiheadAttention(self.hidden, 2, batch_first=True)


class InterruptModel(TinySeqModel):
    """Raises ``KeyboardInterrupt`` in ``training_step`` at ``global_step == interrupt_at`` (a Ctrl-C)."""

    def __init__(self, interrupt_at: int) -> None:
        super().__init__()
        self.interrupt_at = interrupt_at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.interrupt_at:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


class PackedBiLSTMModel(pl.LightningModule):
    """Bidirectional LSTM over a ``PackedSequence`` of variable-length sequences; batches are
    ``(x padded (B, T, features), lengths (B,), y (B,))``; the head reads both directions' ``h_n``."""

    def __init__(self, features: int = 3, hidden: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        return self.head(torch.cat([h_n[0], h_n[1]], dim=-1)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, lengths, y = batch
        loss = nn.functional.mse_loss(self(x, lengths), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def padded_loader(lengths: list[int], features: int = 3, batch_size: int = 4, seed: int = 0):
    """Right-padded sequences of the given lengths, as ``(x, lengths, y)`` batches."""
    gen = torch.Generator().manual_seed(seed)
    steps = max(lengths)
    x = torch.randn(len(lengths), steps, features, generator=gen)
    lens = torch.tensor(lengths)
    x = x * (torch.arange(steps)[None, :, None] < lens[:, None, None])
    y = x.sum((1, 2)) / 4
    dataset = torch.utils.data.TensorDataset(x, lens, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)
