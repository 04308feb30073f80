"""What a recording holds: plain dataclasses of CPU float32 tensors, no references to the model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

LSTM_GATES = ("input", "forget", "cell", "output")
GRU_GATES = ("reset", "update", "new")


@dataclass
class RNNRecord:
    """Everything recorded for one recurrent module (fused ``nn.LSTM/GRU/RNN`` or a cell called in a loop).

    Every tensor is float32 on the CPU and batch-first. The first axis indexes
    ``layer * num_directions + direction`` as in ``h_n``; the time axis is the sequence position for
    both directions. Steps past a sequence's length (``PackedSequence`` input) are zero. For a cell called
    in a loop, and for a fused module called once per step with each call starting from the previous
    call's final state (a decoder), the time axis is the calls.

    Attributes:
        name: the module's qualified name, as in ``model.named_modules()``.
        kind: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ``"RNN_RELU"``, ``"LSTMCell"``, ``"GRUCell"``,
            ``"RNNCell"``.
        hidden: ``(layers*directions, batch, time, hidden_out)`` the hidden state ``h_t`` after each step
            (``hidden_out`` is ``proj_size`` for a projected LSTM).
        gates: gate activations, each ``(layers*directions, batch, time, hidden_size)``; LSTM keys
            ``input, forget, cell, output``; GRU keys ``reset, update, new``; empty for a vanilla RNN.
        hidden_grad: like ``hidden``: the total gradient ``dL/dh_t`` through time and layers, or
            ``None`` when no backward reached the module.
        cell: LSTM only, ``(layers*directions, batch, time, hidden_size)`` cell states ``c_t``.
        cell_grad: LSTM only, like ``cell``: the total ``dL/dc_t``; ``None`` otherwise.
        lengths: ``(batch,)`` valid length of each sequence.
        num_layers: number of stacked layers (1 for a cell).
        num_directions: 2 for a bidirectional module, else 1.
        exact: ``False`` when the replay could not reproduce the training forward exactly: inter-layer
            dropout of a fused RNN in training mode whose masks were not replayed bit for bit (always on
            CUDA); ``notes`` says why.
        notes: human-readable caveats about this record.
        grad_enabled: whether the recorded call ran with autograd enabled.
    """

    name: str
    kind: str
    hidden: Tensor
    gates: dict[str, Tensor]
    hidden_grad: Tensor | None
    cell: Tensor | None
    cell_grad: Tensor | None
    lengths: Tensor
    num_layers: int = 1
    num_directions: int = 1
    exact: bool = True
    notes: tuple[str, ...] = ()
    grad_enabled: bool = True
    # Summaries that several renderers need, computed once (not part of the record's identity).
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def time(self) -> int:
        return self.hidden.shape[2]

    @property
    def batch(self) -> int:
        return self.hidden.shape[1]

    @property
    def grad_norm(self) -> Tensor | None:
        """``(layers*directions, time)``: mean over the sequences still valid at ``t`` of ``||dL/dh_t||_2``.

        ``NaN`` at a step where no sequence is valid; ``None`` when there is no gradient.
        """
        if self.hidden_grad is None:
            return None
        cached = self.derived.get("grad_norm")
        if cached is None or cached[0] is not self.hidden_grad:
            norms = torch.linalg.vector_norm(self.hidden_grad, dim=-1)  # (LD, B, T)
            valid = self.valid_mask().to(norms.dtype)  # (B, T)
            count = valid.sum(0)  # (T,)
            total = (norms * valid).sum(1)  # (LD, T)
            cached = self.derived["grad_norm"] = (self.hidden_grad, total / count)  # 0/0 -> NaN: no valid sequence
        return cached[1].clone()

    def valid_mask(self) -> Tensor:
        """``(batch, time)`` boolean, ``True`` where step ``t`` lies within sequence ``b``."""
        steps = torch.arange(self.time)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)

    @property
    def all_valid(self) -> bool:
        """Whether every sequence spans the whole time axis (no padding)."""
        return bool((self.lengths == self.time).all())

    def layer_label(self, index: int) -> str:
        """Human label of row ``index`` of the first axis, e.g. ``"layer 1 reverse"``."""
        layer, direction = divmod(index, self.num_directions)
        if self.num_directions == 1:
            return f"layer {layer}"
        return f"layer {layer} {'forward' if direction == 0 else 'reverse'}"


@dataclass
class AttentionRecord:
    """Attention weights of one attention module for the recorded batch.

    Attributes:
        name: the module's qualified name.
        kind: ``"MultiheadAttention"`` or ``"custom"`` (an extractor function).
        attention: ``(batch, heads, T_query, T_key)`` softmax weights, per head, before dropout, with
            every mask applied. ``add_bias_kv`` and ``add_zero_attn`` append their extra key columns at
            the end, as PyTorch does.
        key_lengths: ``(batch,)`` number of real (not padded) keys, from ``key_padding_mask`` when it
            marks a right-padded batch; ``None`` when every key is real.
        exact: always ``True`` for ``nn.MultiheadAttention``; as reported for custom extractors.
        notes: human-readable caveats.
        key_counts: ``(batch, heads or 1, T_query)`` long: how many keys each query may attend to. For
            ``nn.MultiheadAttention`` (also followed through an ``nn.TransformerEncoder``) it is computed
            from the call's masks: ``attn_mask`` (boolean, or ``-inf`` in a float mask), ``is_causal``,
            ``key_padding_mask``, plus the columns of ``add_bias_kv`` / ``add_zero_attn``. For custom
            extractors, whose masks are unknown, it counts the keys with a weight above zero. ``None``
            when every key is allowed for every query.
    """

    name: str
    kind: str
    attention: Tensor
    key_lengths: Tensor | None = None
    exact: bool = True
    notes: tuple[str, ...] = ()
    key_counts: Tensor | None = None

    @property
    def heads(self) -> int:
        return self.attention.shape[1]


Record = RNNRecord | AttentionRecord


@dataclass
class Recording(Mapping[str, Record]):
    """The result of one ``Probe.record()`` block: a mapping from module name to its record.

    It is empty inside the block and filled when the block exits. Modules whose capture failed (see
    ``Probe(strict=...)``) are missing and listed in ``errors``.
    """

    records: dict[str, Record] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Record:
        try:
            return self.records[name]
        except KeyError:
            available = ", ".join(repr(n) for n in self.records) or "none"
            hint = f" (capture failed: {self.errors[name]})" if name in self.errors else ""
            raise KeyError(f"No record for module {name!r}{hint}. Recorded: {available}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def rnn(self) -> dict[str, RNNRecord]:
        """The recurrent records only."""
        return {k: v for k, v in self.records.items() if isinstance(v, RNNRecord)}

    def attention(self) -> dict[str, AttentionRecord]:
        """The attention records only."""
        return {k: v for k, v in self.records.items() if isinstance(v, AttentionRecord)}
