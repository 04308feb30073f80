"""Small builders shared by the probe tests: modules, inputs, a common way to call them, losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

KINDS = ("RNN_TANH", "RNN_RELU", "LSTM", "LSTM_PROJ", "GRU")

STRUCTURES = [
    # layers, bidirectional, batch_first, bias, packed, given_hx, loss
    (1, False, True, True, False, False, "all"),
    (2, True, False, True, True, True, "mixed"),
    (3, True, True, False, True, False, "final"),
    (2, False, False, True, True, True, "last"),
    (1, True, False, False, False, True, "last"),
    (3, False, True, True, False, False, "mixed"),
]


@dataclass(frozen=True)
class RNNConfig:
    kind: str = "LSTM"
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = True
    bias: bool = True
    packed: bool = False
    given_hx: bool = False
    loss: str = "all"  # "all" | "final" | "last" | "mixed"
    batch: int = 3
    time: int = 5
    input_size: int = 4
    hidden_size: int = 5
    proj_size: int = 3  # only for LSTM_PROJ
    dropout: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        return (
            f"{self.kind}-L{self.num_layers}-{'bi' if self.bidirectional else 'uni'}"
            f"-{'bf' if self.batch_first else 'tf'}-{'bias' if self.bias else 'nobias'}"
            f"-{'packed' if self.packed else 'padded'}-{'hx' if self.given_hx else 'nohx'}-{self.loss}"
        )


def build_rnn(cfg: RNNConfig) -> nn.RNNBase:
    kw = dict(
        input_size=cfg.input_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        bias=cfg.bias,
        batch_first=cfg.batch_first,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout,
    )
    torch.manual_seed(cfg.seed)
    if cfg.kind == "LSTM":
        return nn.LSTM(**kw)
    if cfg.kind == "LSTM_PROJ":
        return nn.LSTM(proj_size=cfg.proj_size, **kw)
    if cfg.kind == "GRU":
        return nn.GRU(**kw)
    if cfg.kind == "RNN_TANH":
        return nn.RNN(nonlinearity="tanh", **kw)
    if cfg.kind == "RNN_RELU":
        return nn.RNN(nonlinearity="relu", **kw)
    raise ValueError(cfg.kind)


def rows_and_sizes(module: nn.RNNBase) -> tuple[int, int, int]:
    """``(layers*directions, hidden_out, hidden_size)``."""
    D = 2 if module.bidirectional else 1
    proj = getattr(module, "proj_size", 0)
    return module.num_layers * D, (proj if proj > 0 else module.hidden_size), module.hidden_size


@dataclass
class RNNInputs:
    x: Tensor  # (B, T, I) batch-first, zero past each length
    lengths: Tensor  # (B,) int64; max == T
    h0: Tensor | None
    c0: Tensor | None


def make_inputs(cfg: RNNConfig, module: nn.RNNBase) -> RNNInputs:
    g = torch.Generator().manual_seed(1000 + cfg.seed)
    B, T = cfg.batch, cfg.time
    x = torch.randn(B, T, cfg.input_size, generator=g)
    if cfg.packed:
        # unsorted, distinct-ish lengths in [1, T], with T present so the padded time axis is T
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        full = int(torch.randint(0, B, (1,), generator=g))
        lengths[full] = T
        if B > 1 and bool((lengths == T).all()):
            lengths[(full + 1) % B] = max(1, T - 2)
    else:
        lengths = torch.full((B,), T, dtype=torch.long)
    for b in range(B):
        x[b, int(lengths[b]) :] = 0.0
    h0 = c0 = None
    if cfg.given_hx:
        rows, h_out, h = rows_and_sizes(module)
        h0 = 0.5 * torch.randn(rows, B, h_out, generator=g)
        if isinstance(module, nn.LSTM):
            c0 = 0.5 * torch.randn(rows, B, h, generator=g)
    return RNNInputs(x=x, lengths=lengths.to(torch.long), h0=h0, c0=c0)


def run_rnn(module: nn.RNNBase, inp: RNNInputs, packed: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Call ``module`` the way a user would; return ``(output (B,T,D*H_out), h_n, c_n)`` batch-first."""
    T = inp.x.shape[1]
    x = inp.x if module.batch_first else inp.x.transpose(0, 1).contiguous()
    if packed:
        x = pack_padded_sequence(x, inp.lengths, batch_first=module.batch_first, enforce_sorted=False)
    hx = None
    if inp.h0 is not None:
        hx = (inp.h0, inp.c0) if isinstance(module, nn.LSTM) else inp.h0
    out, state = module(x, hx)
    if packed:
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    elif not module.batch_first:
        out = out.transpose(0, 1)
    if isinstance(module, nn.LSTM):
        h_n, c_n = state
    else:
        h_n, c_n = state, None
    return out, h_n, c_n


class WeightedLoss:
    """A fixed random functional of ``(output, h_n, c_n)`` applicable to module and reference alike.

    ``mode``: ``"all"`` every output step; ``"final"`` only ``h_n`` (and ``c_n``); ``"last"`` only the
    output at each sequence's last valid step (many-to-one); ``"mixed"`` all of the above.
    """

    def __init__(self, mode: str, output_shape, hn_shape, cn_shape, lengths: Tensor, seed: int = 0):
        g = torch.Generator().manual_seed(7919 + seed)
        self.mode = mode
        self.lengths = lengths
        self.w_out = torch.randn(*output_shape, generator=g)
        self.w_hn = torch.randn(*hn_shape, generator=g)
        self.w_cn = None if cn_shape is None else torch.randn(*cn_shape, generator=g)
        self.w_last = torch.randn(output_shape[0], output_shape[2], generator=g)

    def __call__(self, out: Tensor, h_n: Tensor, c_n: Tensor | None) -> Tensor:
        dt = out.dtype
        total = out.new_zeros(())
        if self.mode in ("all", "mixed"):
            total = total + (out * self.w_out.to(dt)).sum()
        if self.mode in ("final", "mixed"):
            total = total + (h_n * self.w_hn.to(dt)).sum()
            if c_n is not None:
                total = total + (c_n * self.w_cn.to(dt)).sum()
        if self.mode in ("last", "mixed"):
            idx = (self.lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[2])
            last = out.gather(1, idx).squeeze(1)  # (B, D*H_out)
            total = total + (last * self.w_last.to(dt)).sum()
        return total


def loss_for(cfg: RNNConfig, module: nn.RNNBase, inp: RNNInputs) -> WeightedLoss:
    rows, h_out, h = rows_and_sizes(module)
    B, T = inp.x.shape[:2]
    D = 2 if module.bidirectional else 1
    return WeightedLoss(
        cfg.loss,
        (B, T, D * h_out),
        (rows, B, h_out),
        (rows, B, h) if isinstance(module, nn.LSTM) else None,
        inp.lengths,
        seed=cfg.seed,
    )
