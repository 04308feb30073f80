"""Hand-built records for the renderer tests (no model, no Probe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_rnnviz.probe.records import GRU_GATES, LSTM_GATES, AttentionRecord, RNNRecord

MAX_SIDE = 800
MAX_PNG_BYTES = 150_000


def _walk(shape: tuple[int, ...], seed: int, step: float = 0.3) -> torch.Tensor:
    """Smooth-ish states in (-1, 1): tanh of a random walk along the time axis (dim 2)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.tanh((torch.randn(*shape, generator=generator) * step).cumsum(2))


def make_rnn(
    kind: str = "LSTM",
    layers: int = 1,
    directions: int = 1,
    batch: int = 3,
    time: int = 20,
    hidden: int = 8,
    lengths: list[int] | None = None,
    grad: bool = True,
    seed: int = 0,
) -> RNNRecord:
    """A record with plausible values: padded steps are zero, gradients decay going back in time."""
    rows = layers * directions
    lengths_t = torch.tensor(
        lengths if lengths is not None else [time] + [max(1, time - 3 * i) for i in range(1, batch)]
    )
    valid = (torch.arange(time).unsqueeze(0) < lengths_t.unsqueeze(1)).to(torch.float32)[None, :, :, None]
    states = _walk((rows, batch, time, hidden), seed) * valid
    names = LSTM_GATES if kind.startswith("LSTM") else GRU_GATES if kind.startswith("GRU") else ()
    gates = {}
    for offset, name in enumerate(names):
        raw = _walk((rows, batch, time, hidden), seed + 1 + offset, step=0.6)
        gates[name] = (raw if name in ("cell", "new") else (raw + 1) / 2) * valid
    hidden_grad = None
    if grad:
        generator = torch.Generator().manual_seed(seed + 100)
        decay = 10.0 ** ((torch.arange(time, dtype=torch.float32) - time) / 10)
        hidden_grad = (
            torch.randn(rows, batch, time, hidden, generator=generator) * decay[None, None, :, None] * valid
        )
    cell = _walk((rows, batch, time, hidden), seed + 50) * valid if kind.startswith("LSTM") else None
    return RNNRecord(
        name="encoder.rnn",
        kind=kind,
        hidden=states,
        gates=gates,
        hidden_grad=hidden_grad,
        cell=cell,
        cell_grad=None,
        lengths=lengths_t,
        num_layers=layers,
        num_directions=directions,
    )


def make_attention(
    batch: int = 2,
    heads: int = 4,
    queries: int = 6,
    keys: int = 8,
    key_lengths: list[int] | None = None,
    seed: int = 0,
) -> AttentionRecord:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, queries, keys, generator=generator) * 2
    lengths = torch.tensor(key_lengths) if key_lengths is not None else None
    if lengths is not None:
        padded = torch.arange(keys)[None, None, None, :] >= lengths[:, None, None, None]
        logits = logits.masked_fill(padded, -torch.inf)
    return AttentionRecord("decoder.attn", "MultiheadAttention", logits.softmax(-1), lengths)


def check_image(rgb: np.ndarray) -> None:
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert max(rgb.shape[:2]) <= MAX_SIDE


def has_bad_color(rgb: np.ndarray) -> bool:
    """Whether the magenta NaN colour appears in the image."""
    return bool(((rgb[..., 0] > 240) & (rgb[..., 1] < 15) & (rgb[..., 2] > 240)).any())


@pytest.fixture
def rnn_record():
    return make_rnn


@pytest.fixture
def attention_record():
    return make_attention


@pytest.fixture
def image_ok():
    return check_image


@pytest.fixture
def shows_bad_color():
    return has_bad_color
