"""Probe sets for the explorer's browser tests, built per the contract (docs/explorer.md) with
`lightning_rnnviz.payload.Packer`: one from real `Probe` records of a small LSTM with self-attention, one
planted (a unit that fires on one token, a distractor that fires around it, a unit always on)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lightning_rnnviz import Probe
from lightning_rnnviz.names import PROBE_SET_TAG
from lightning_rnnviz.payload import Packer

TRAIN = f"{PROBE_SET_TAG}/train"
VAL = f"{PROBE_SET_TAG}/val"
VOCAB = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "home"]


class Tiny(nn.Module):
    """Embedding -> 2-layer LSTM -> 2-head self-attention -> one output per step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), 6)
        self.lstm = nn.LSTM(6, 10, num_layers=2, batch_first=True)
        self.attn = nn.MultiheadAttention(10, 2, batch_first=True)
        self.head = nn.Linear(10, 1)
        with torch.no_grad():  # sharper attention than at initialisation, so the heads have something to show
            self.attn.in_proj_weight.mul_(25.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(ids))
        a, _ = self.attn(h, h, h)
        return self.head(a).squeeze(-1)


def horizon(norms: np.ndarray, length: int) -> int | None:
    """The step where the curve, followed back from its last valid step, first falls below 1 % of its peak."""
    curve = norms[:length]
    peak = float(curve.max()) if length else 0.0
    for t in range(length - 1, -1, -1):
        if curve[t] < 0.01 * peak:
            return t
    return None


def rnn_module(packer: Packer, rec, rows: list[int]) -> dict:
    layers = []
    lengths = rec.lengths.tolist()
    norms = None if rec.hidden_grad is None else torch.linalg.vector_norm(rec.hidden_grad, dim=-1).numpy()
    for i in range(rec.hidden.shape[0]):
        hidden = rec.hidden[i].numpy()[rows]
        units = list(range(hidden.shape[-1]))
        layers.append({
            "layer": i // rec.num_directions, "direction": i % rec.num_directions, "label": f"layer {i}",
            "units": units, "units_total": len(units), "hidden": packer.add(hidden),
            "gate_units": units, "gates": {g: packer.add(v[i].numpy()[rows]) for g, v in rec.gates.items()},
            "grad_norm": None if norms is None else packer.add(norms[i][rows]),
            "horizon": None if norms is None else [horizon(norms[i][k], lengths[k]) for k in rows],
        })
    return {"type": "rnn", "name": rec.name, "kind": rec.kind, "exact": rec.exact, "layers": layers}


def attention_module(packer: Packer, rec, rows: list[int], steps: int) -> dict:
    weights = rec.attention.numpy()[rows]
    return {"type": "attention", "name": rec.name, "kind": rec.kind, "exact": rec.exact, "heads": rec.heads,
            "weights": packer.add(weights), "query_lengths": [steps] * len(rows),
            "key_lengths": [steps] * len(rows), "tokens_are_steps": True}


def lstm_recordings(batch: int = 4, steps: int = 12):
    """A real model, two training recordings (an optimizer step apart) and one validation recording.

    Returns ``(ids, tokens, [(step, source, recording)])``.
    """
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, len(VOCAB), (batch, steps))
    tokens = [[VOCAB[i] for i in row] for row in ids.tolist()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for step in (5, 10):
        with Probe(model).record() as rec:
            loss = (model(ids) - 1.0).pow(2).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append((step, "training", rec))
    with torch.no_grad(), Probe(model).record() as rec:
        model(ids)
    out.append((10, "validation", rec))
    return ids, tokens, out


def lstm_blob(rec, tokens: list[list[str]], step: int, source: str, notes: tuple[str, ...] = ()) -> bytes:
    packer = Packer()
    lstm = rec["lstm"]
    rows = list(range(lstm.hidden.shape[1]))
    steps = lstm.hidden.shape[2]
    modules = [rnn_module(packer, lstm, rows), attention_module(packer, rec["attn"], rows, steps)]
    header = {"step": step, "source": source, "rows": rows, "lengths": lstm.lengths.tolist(), "steps": steps,
              "tokens": tokens, "notes": list(notes), "modules": modules}
    return packer.finish(header)


# ------------------------------------------------------------------------------------------ planted
PLANTED_UNIT = 9  # fires (0.9) on the token "X" and nowhere else
PARTNER = 11  # fires (0.85) on "X" and on "W": on together with PLANTED_UNIT only on "X"
DISTRACTOR = 5  # fires (0.8) at the step before each "X" and on it, and on "Y Y" in sequence 2
ALWAYS_ON = 13  # 0.7 everywhere: on in any range, but also just before it
PLANTED_UNITS = [2, 5, 7, 9, 11, 13]  # of 16
PLANTED_TOKENS = [
    "a b c d X e f g h i j X k l m n".split(),
    "p q W s t u v X w x y z a b".split() + ["<pad>", "<pad>"],
    "b c d e f Y Y g h i W k l m n o".split(),
]
PLANTED_LENGTHS = [16, 14, 16]


def planted_blob(seed: int = 1) -> tuple[bytes, dict]:
    """A vanilla RNN's probe set (no gates, no gradients) with the planted units; and what select and
    match must find: ``{"x_steps": [(k, t)], "distractor_runs": [(k, start, end)]}``."""
    rng = np.random.default_rng(seed)
    K, T, U = len(PLANTED_TOKENS), 16, len(PLANTED_UNITS)
    hidden = rng.uniform(-0.3, 0.3, size=(K, T, U)).astype(np.float32)
    col = {u: i for i, u in enumerate(PLANTED_UNITS)}
    hidden[:, :, col[ALWAYS_ON]] = 0.7
    x_steps, distractor_runs = [], []
    for k, toks in enumerate(PLANTED_TOKENS):
        for t, tok in enumerate(toks[:PLANTED_LENGTHS[k]]):
            if tok == "X":
                hidden[k, t, col[PLANTED_UNIT]] = 0.9
                hidden[k, t, col[PARTNER]] = 0.85
                hidden[k, t - 1 : t + 1, col[DISTRACTOR]] = 0.8
                x_steps.append((k, t))
                distractor_runs.append((k, t - 1, t))
            if tok == "W":
                hidden[k, t, col[PARTNER]] = 0.85
        if k == 2:
            hidden[k, 5:7, col[DISTRACTOR]] = 0.8
            distractor_runs.append((k, 5, 6))
    for k, n in enumerate(PLANTED_LENGTHS):
        hidden[k, n:] = 0.0
    packer = Packer()
    module = {"type": "rnn", "name": "rnn", "kind": "RNN_TANH", "exact": True, "layers": [{
        "layer": 0, "direction": 0, "label": "", "units": PLANTED_UNITS, "units_total": 16,
        "hidden": packer.add(hidden), "gate_units": PLANTED_UNITS, "gates": {}, "grad_norm": None,
        "horizon": None}]}
    header = {"step": 7, "source": "validation", "rows": list(range(K)), "lengths": PLANTED_LENGTHS, "steps": T,
              "tokens": PLANTED_TOKENS, "notes": ["hidden: the 6 of 16 units with the largest variance"],
              "modules": [module]}
    return packer.finish(header), {"x_steps": x_steps, "distractor_runs": distractor_runs, "hidden": hidden}
