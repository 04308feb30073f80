"""What a recording holds: plain dataclasses of float32 tensors, no references to the model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

LSTM_GATES = ("input", "forget", "cell", "output")
GRU_GATES = ("reset", "update", "new")


@dataclass
class RNNRecord:
    """Everything recorded for one recurrent module (fused ``nn.LSTM/GRU/RNN`` or a cell called in a loop).

    Every tensor is float32 and batch-first, on the CPU; with ``Probe(on_device=True)`` the recorded
    tensors stay on the device where the module ran (:attr:`device`; ``lengths`` stays on the CPU), so
    that reductions run there and only their small results cross to the host (:meth:`cpu` copies the
    record to the host). The first axis indexes
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
        calls: which forward calls of the module in the recording the record shows, 0-based, with how
            many there were: ``((0, 1), 2)`` for an encoder call and a decoder call from its final state
            shown as one sequence, ``((1,), 2)`` for the second of two unrelated calls.
        call_starts: ``(calls, batch)`` where each call's steps begin on each sequence's time axis, when
            several calls of more than one step are shown as one sequence (each sequence's valid steps of
            one call follow those of the call before); ``None`` otherwise.
        context: what the record's pictures say besides caveats (which calls they show, which module
            its final state starts); not a reason for ``exact`` to be ``False``.
        direct_from: ``(batch,)`` the first step of each sequence at which a gradient entered the module
            from outside (through its output at that step, or through ``h_n``/``c_n`` at the sequence's
            last step), ``-1`` where none did; ``None`` when not known (cells). It decides
            :attr:`grad_alignment`.
        feeds: the name of the recorded module whose first call started from this module's final state
            (an encoder whose ``h_n`` starts the decoder), ``None`` when none did (cells: never known).
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
    calls: tuple[tuple[int, ...], int] = ((0,), 1)
    call_starts: Tensor | None = None
    context: tuple[str, ...] = ()
    direct_from: Tensor | None = None
    feeds: str | None = None
    # Summaries that several renderers need, computed once (not part of the record's identity).
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def time(self) -> int:
        return self.hidden.shape[2]

    @property
    def device(self) -> torch.device:
        """Where the recorded tensors live (the CPU unless the probe kept them on the module's device)."""
        return self.hidden.device

    def cpu(self) -> RNNRecord:
        """This record with every tensor on the CPU (itself when it is there already)."""
        if self.device.type == "cpu":
            return self

        def host(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.cpu()

        return replace(self, hidden=self.hidden.cpu(), gates={k: v.cpu() for k, v in self.gates.items()},
                       hidden_grad=host(self.hidden_grad), cell=host(self.cell), cell_grad=host(self.cell_grad))

    @property
    def batch(self) -> int:
        return self.hidden.shape[1]

    @property
    def grad_alignment(self) -> str:
        """How :attr:`grad_norm` lines up the sequences: ``"end"`` when their lengths differ and the gradient
        enters each at the same number of steps before its end but not at the same step from its start (a
        many-to-one loss; an encoder followed by a decoder of fixed length), so that the curve follows the
        gradient back from where it entered instead of averaging sequence ends at different steps;
        ``"start"`` otherwise (equal lengths, a loss at every step, or nothing known)."""
        if self.direct_from is None or self.all_valid:
            return "start"
        entered = self.direct_from.cpu() >= 0
        if not bool(entered.any()):
            return "start"
        from_start = self.direct_from.cpu()[entered]
        from_end = (self.lengths.cpu() - 1 - self.direct_from.cpu())[entered]
        same_from_end = bool((from_end == from_end[0]).all())
        same_from_start = bool((from_start == from_start[0]).all())
        return "end" if same_from_end and not same_from_start else "start"

    @property
    def grad_norm(self) -> Tensor | None:
        """``(layers*directions, time)``: mean over the sequences of ``||dL/dh_t||_2``, lined up as
        :attr:`grad_alignment` says: at their first step (column ``t`` is step ``t`` of every sequence long
        enough), or at their last (column ``T_max - 1 - d`` is ``d`` steps before each sequence's end, for
        the sequences longer than ``d``; ``T_max`` the longest length).

        ``NaN`` where no sequence is valid; ``None`` when there is no gradient. Reduced where the record
        lives; the result is on the CPU.
        """
        if self.hidden_grad is None:
            return None
        cached = self.derived.get("grad_norm")
        if cached is None or cached[0] is not self.hidden_grad:
            norms = torch.linalg.vector_norm(self.hidden_grad, dim=-1)  # (LD, B, T)
            valid = self.valid_mask(norms.device)  # (B, T)
            if self.grad_alignment == "end":
                # column j of sequence b is its step j - (T_max - length_b)
                longest = int(self.lengths.max())
                shift = (longest - self.lengths.to(torch.int64)).to(norms.device)
                source = torch.arange(norms.shape[-1], device=norms.device).unsqueeze(0) - shift.unsqueeze(1)
                inside = source >= 0
                index = source.clamp(min=0)
                norms = norms.gather(2, index.unsqueeze(0).expand_as(norms))
                valid = valid.gather(1, index) & inside
            valid = valid.to(norms.dtype)
            count = valid.sum(0)  # (T,)
            total = (norms * valid).sum(1)  # (LD, T)
            # 0/0 -> NaN: no valid sequence
            cached = self.derived["grad_norm"] = (self.hidden_grad, (total / count).cpu())
        return cached[1].clone()

    def valid_mask(self, device: torch.device | str | None = None) -> Tensor:
        """``(batch, time)`` boolean, ``True`` where step ``t`` lies within sequence ``b``; on ``device``,
        by default the record's."""
        steps = torch.arange(self.time)
        mask = steps.unsqueeze(0) < self.lengths.cpu().unsqueeze(1)
        device = self.device if device is None else torch.device(device)
        return mask if device.type == "cpu" else mask.to(device)

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
        kind: ``"MultiheadAttention"``, ``"custom"`` (an extractor function), or the class name of a
            library's attention read without an extractor (``"InterpretableMultiHeadAttention"``, ...).
        attention: ``(batch, heads, T_query, T_key)`` softmax weights, per head, before dropout, with
            every mask applied; on the CPU, or where the module ran with ``Probe(on_device=True)``.
            ``add_bias_kv`` and ``add_zero_attn`` append their extra key columns at the end, as PyTorch
            does.
        key_lengths: ``(batch,)`` number of real (not padded) keys, from ``key_padding_mask`` when it
            marks a right-padded batch; ``None`` when every key is real.
        exact: always ``True`` for ``nn.MultiheadAttention``; as reported for custom extractors.
        notes: human-readable caveats.
        key_counts: ``(batch, heads or 1, T_query)`` long: how many keys each query may attend to. For
            ``nn.MultiheadAttention`` (also followed through an ``nn.TransformerEncoder``) it is computed
            from the call's masks: ``attn_mask`` (boolean, or ``-inf`` in a float mask), ``is_causal``,
            ``key_padding_mask``, plus the columns of ``add_bias_kv`` / ``add_zero_attn``. For custom
            extractors, whose masks are unknown, it counts the keys with a weight above zero. ``None``
            when every key is allowed for every query. On the same device as ``attention``.
        query_is_key: whether the call's query was its key, the very tensor (self-attention: an
            ``nn.TransformerEncoder``'s layers, ``attn(x, x, x)``); ``False`` for a call with another key
            (cross-attention, ``attn(x, memory, memory)``); ``None`` where it is not known (extractors,
            other libraries' classes).
    """

    name: str
    kind: str
    attention: Tensor
    key_lengths: Tensor | None = None
    exact: bool = True
    notes: tuple[str, ...] = ()
    key_counts: Tensor | None = None
    query_is_key: bool | None = None

    @property
    def heads(self) -> int:
        return self.attention.shape[1]

    @property
    def device(self) -> torch.device:
        """Where ``attention`` lives."""
        return self.attention.device

    def cpu(self) -> AttentionRecord:
        """This record with every tensor on the CPU (itself when it is there already)."""
        if self.device.type == "cpu":
            return self
        counts = None if self.key_counts is None else self.key_counts.cpu()
        lengths = None if self.key_lengths is None else self.key_lengths.cpu()
        return replace(self, attention=self.attention.cpu(), key_counts=counts, key_lengths=lengths)


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

    def cpu(self) -> Recording:
        """This recording with every record on the CPU."""
        return Recording({k: v.cpu() for k, v in self.records.items()}, dict(self.errors))
