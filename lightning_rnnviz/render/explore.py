"""The explorer's data: one recording's probe set, a few fixed sequences of the batch with every layer's
hidden states, gate activations, ``||dL/dh_t||`` and attention weights, as one blob of
:mod:`lightning_rnnviz.payload`'s format (the header's fields are described in ``docs/explorer.md``).

The blob is bounded: each layer and direction keeps at most :data:`MAX_UNITS` hidden units (those of the
largest variance over the probe set's valid steps), then sequences are dropped from the end until it fits
``max_bytes``; the header's ``notes`` say what was left out. Only the chosen rows and units of a record kept
on a device cross to the host.

Example::

    >>> import torch
    >>> from lightning_rnnviz.payload import unpack
    >>> from lightning_rnnviz.probe.records import RNNRecord
    >>> h = torch.arange(24.0).reshape(1, 2, 3, 4)  # (layers*directions, batch, time, units)
    >>> rec = RNNRecord("rnn", "RNN_TANH", h, {}, None, None, None, torch.tensor([3, 2]))
    >>> header, array = unpack(probe_set({"rnn": rec}, rows=[1], step=5, source="validation"))
    >>> header["rows"], header["lengths"], array(header["modules"][0]["layers"][0]["hidden"])[0, :, 0].tolist()
    ([1], [2], [12.0, 16.0, 0.0])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_rnnviz.payload import Packer
from lightning_rnnviz.probe.records import AttentionRecord, RNNRecord
from lightning_rnnviz.render.gradients import sequence_grad_norms, sequence_horizons

MAX_BYTES = 2 * 1024 * 1024
"""The default bound on one probe set's blob: 2 MiB."""
MAX_UNITS = 256
"""The most hidden units a probe set keeps per layer and direction (those of the largest variance)."""
SOURCES = ("training", "validation")


def probe_set(
    records: Mapping[str, RNNRecord | AttentionRecord],
    rows: Sequence[int],
    step: int,
    source: str,
    tokens: Sequence[Sequence[str] | None] | None = None,
    *,
    max_bytes: int = MAX_BYTES,
    max_units: int = MAX_UNITS,
    notes: Sequence[str] = (),
    module_tokens: Mapping[str, Mapping[str, Sequence[Sequence[str] | None]]] | None = None,
) -> bytes:
    """One recording's probe set as a blob of at most ``max_bytes`` bytes.

    Args:
        records: the recorded modules to write, by name, in the order the explorer lists them.
        rows: which sequences of the recorded batch (its first axis), in order; rows past the recorded
            batch are left out (a note says so).
        step: the step the recording is logged at.
        source: ``"training"`` or ``"validation"``.
        tokens: per row of ``rows``, its tokens (one per valid step; the rest of the time axis gets ``""``)
            or ``None``; ``None`` for none at all.
        max_bytes: the bound on the blob's size.
        max_units: the most hidden units kept per layer and direction.
        notes: what the header's ``notes`` say first (the caller's caveats).
        module_tokens: per module name, the tokens of each of its axes per row of ``rows`` (``"time"`` for a
            recurrent module, ``"query"`` and ``"key"`` for an attention module), where they are not the
            sequence's: written as the module's ``tokens``, ``query_tokens`` and ``key_tokens`` (an
            encoder-decoder's decoder and cross-attention; the explorer prefers them to ``tokens``).

    Raises:
        ValueError: a wrong argument, no record, no row recorded, or a single sequence that does not fit
            ``max_bytes``.
    """
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}.")
    if not records:
        raise ValueError("a probe set needs at least one record")
    if max_units < 1 or max_bytes < 1:
        raise ValueError(f"`max_units` and `max_bytes` must be positive, got {max_units} and {max_bytes}")
    rows = [int(r) for r in rows]
    if tokens is not None and len(tokens) != len(rows):
        raise ValueError(f"{len(tokens)} token lists for {len(rows)} rows")
    if any(r < 0 for r in rows):
        raise ValueError(f"rows must not be negative, got {rows}")
    batch = min(_batch(r) for r in records.values())
    notes: list[str] = [str(n) for n in notes]
    kept = [i for i, r in enumerate(rows) if r < batch]
    if len(kept) < len(rows):
        notes.append(f"rows {', '.join(str(r) for r in rows if r >= batch)} were not recorded (the batch holds "
                     f"{batch} sequences)")
    if not kept:
        raise ValueError(f"none of the rows {rows} lies in the recorded batch of {batch} sequences")
    tokens = None if tokens is None else [tokens[i] for i in kept]
    rows = [rows[i] for i in kept]

    rnn = [(n, r) for n, r in records.items() if isinstance(r, RNNRecord)]
    attention = [(n, r) for n, r in records.items() if isinstance(r, AttentionRecord)]
    steps = max(r.time for _, r in rnn) if rnn else max(r.attention.shape[-1] for _, r in attention)
    if rnn:
        lengths = rnn[0][1].lengths.cpu()[rows].tolist()
    else:
        first = attention[0][1]
        lengths = (first.key_lengths.cpu()[rows].tolist() if first.key_lengths is not None
                   else [first.attention.shape[-1]] * len(rows))
    if not records_agree(rnn, rows):
        notes.append(f"\"lengths\" are those of {rnn[0][0]!r}; each recurrent module lists its own")
    if source == "validation":
        notes.append("no gradients: validation runs without them; ||dL/dh_t|| comes from the training recordings")

    modules: list[_Module] = []
    for name, record in records.items():
        if isinstance(record, RNNRecord):
            modules.append(_rnn(name, record, rows, steps, max_units, notes, source == "training"))
        else:
            modules.append(_attention(name, record, rows, steps))
        for axis, values in (module_tokens or {}).get(name, {}).items():
            field = {"time": "tokens", "query": "query_tokens", "key": "key_tokens"}[axis]
            modules[-1].lists[(field,)] = [None if values[i] is None else [str(x) for x in values[i]] for i in kept]
        if not record.exact:
            notes.append(f"{name!r} is approximate: {' '.join(record.notes) or 'the replay was not exact'}")

    padded = None if tokens is None or all(t is None for t in tokens) else [
        None if t is None else [str(x) for x in t][:steps] + [""] * max(0, steps - len(t)) for t in tokens]

    def assemble(k: int, cap: int | None) -> bytes:
        extra = []
        if k < len(rows):
            extra.append(f"{k} of the {len(rows)} sequences (rows {', '.join(map(str, rows[:k]))}): all "
                         f"{len(rows)} would exceed the bound of {max_bytes} bytes")
        if cap is not None:
            extra.append(f"one sequence with every unit kept would exceed the bound of {max_bytes} bytes: at most "
                         f"{cap} units per layer and direction, those of the largest variance, listed in \"units\"")
        packer = Packer()
        header = {
            "step": int(step), "source": source, "rows": rows[:k], "lengths": [int(n) for n in lengths[:k]],
            "steps": int(steps), "tokens": None if padded is None else padded[:k], "notes": notes + extra,
            "modules": [m.header(packer, k, cap) for m in modules],
        }
        return packer.finish(header)

    # the bound: sequences dropped from the end; where one alone does not fit, fewer units (the quietest first)
    widest = max((m.widest for m in modules), default=0)
    per_sequence = sum(array[:1].nbytes for m in modules for array, _ in m.arrays.values())
    k, cap = max(1, min(len(rows), max_bytes // max(per_sequence, 1))), None  # the arrays alone fit
    blob = assemble(k, cap)
    while len(blob) > max_bytes:
        if k > 1:
            k = max(1, min(k - 1, k * max_bytes // len(blob)))
        else:
            current = widest if cap is None else cap
            if current <= 1:
                raise ValueError(f"one sequence of the probe set takes {len(blob)} bytes with one unit per layer, "
                                 f"more than the bound of {max_bytes} bytes; no probe set is written for step {step}")
            cap = max(1, min(current - 1, current * max_bytes // len(blob)))
        blob = assemble(k, cap)
    return blob


def records_agree(rnn: Sequence[tuple[str, RNNRecord]], rows: Sequence[int]) -> bool:
    """Whether every recurrent record has the first one's lengths at ``rows``."""
    if len(rnn) < 2:
        return True
    first = rnn[0][1].lengths.cpu()[list(rows)]
    return all(torch.equal(r.lengths.cpu()[list(rows)], first) for _, r in rnn[1:])


def _batch(record: RNNRecord | AttentionRecord) -> int:
    return record.batch if isinstance(record, RNNRecord) else int(record.attention.shape[0])


class _Module:
    """One module's part of the header: its fields, arrays (first axis: the sequences) to cut to the first
    ``k`` sequences, lists (one entry a sequence) likewise, and unit groups: the units an array's last axis
    holds (``units``, ascending), listed at ``paths``, with ``rank`` their positions by decreasing variance,
    so that the ``cap`` of the largest variance can be kept."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.arrays: dict[tuple, tuple[np.ndarray, Any]] = {}  # path -> (array, its unit group or None)
        self.lists: dict[tuple, list] = {}
        self.groups: dict[Any, tuple[list[tuple], list[int], list[int]]] = {}  # key -> (paths, units, rank)

    @property
    def widest(self) -> int:
        return max((len(units) for _, units, _ in self.groups.values()), default=0)

    def header(self, packer: Packer, k: int, cap: int | None = None) -> dict[str, Any]:
        out = copy.deepcopy(self.fields)
        positions: dict[Any, np.ndarray | None] = {}
        for key, (paths, units, rank) in self.groups.items():
            chosen = None if cap is None or cap >= len(units) else np.sort(np.asarray(rank[:cap]))
            positions[key] = chosen
            for path in paths:
                _put(out, path, list(units) if chosen is None else [units[p] for p in chosen])
        for path, (array, group) in self.arrays.items():
            chosen = positions.get(group)
            part = array[:k] if chosen is None else array[:k][..., chosen]
            _put(out, path, packer.add(part))
        for path, values in self.lists.items():
            _put(out, path, values[:k])
        return out


def _put(tree: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _host(values: torch.Tensor, steps: int) -> np.ndarray:
    """``values`` ``(K, T, ...)`` as float32 on the host, the time axis zero-padded to ``steps``."""
    out = values.detach().float().cpu().numpy()
    if out.shape[1] < steps:
        pad = [(0, 0)] * out.ndim
        pad[1] = (0, steps - out.shape[1])
        out = np.pad(out, pad)
    return np.ascontiguousarray(out)


def _variance(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(U,)`` each unit's variance over the valid steps ``mask`` ``(K, T)`` of ``values`` ``(K, T, U)``,
    where they live."""
    weight = mask.to(values.dtype).unsqueeze(-1)
    count = weight.sum().clamp(min=1)
    mean = (values * weight).sum((0, 1)) / count
    return ((values - mean).square() * weight).sum((0, 1)) / count


def _largest(variance: torch.Tensor, most: int) -> tuple[torch.Tensor, list[int]]:
    """The ``most`` units of the largest ``variance`` (a unit with NaN/Inf counts as the largest), ascending
    (on the host), and their positions in that list by decreasing variance."""
    variance = torch.nan_to_num(variance.float(), nan=float("inf"))
    order = variance.argsort(descending=True, stable=True)[:most].cpu()
    units = order.sort().values
    rank = torch.searchsorted(units, order).tolist()
    return units, rank


def _rnn(name: str, record: RNNRecord, rows: list[int], steps: int, max_units: int, notes: list[str],
         training: bool) -> _Module:
    device = record.device
    index = torch.tensor(rows, device=device)
    mask = record.valid_mask()[index]  # (K, T) where the record lives
    keep = mask.unsqueeze(-1)
    lengths = record.lengths.cpu()[rows]
    norms = sequence_grad_norms(record)  # (LD, B, T) on the host, or None
    horizons = sequence_horizons(record)  # (LD, B)
    if record.time < steps:
        notes.append(f"{name!r} has {record.time} steps, padded with zeros to {steps}")
    if norms is None:
        if training:
            notes.append(f"no gradients for {name!r}: no backward reached it in this recording")
    layers: list[dict[str, Any]] = []
    module = _Module({"type": "rnn", "name": name, "kind": record.kind, "exact": bool(record.exact),
                      "layers": layers})
    bounded: list[str] = []
    single = record.hidden.shape[0] == 1
    for i in range(record.hidden.shape[0]):
        layer, direction = divmod(i, record.num_directions)
        hidden = record.hidden[i].index_select(0, index)  # (K, T, U)
        units, rank = _largest(_variance(hidden, mask), max_units)
        total = int(hidden.shape[-1])
        if len(units) < total:
            bounded.append(record.layer_label(i))
        entry: dict[str, Any] = {
            "layer": layer, "direction": direction, "label": "" if single else record.layer_label(i),
            "units": units.tolist(), "units_total": total, "hidden": None, "gate_units": units.tolist(),
            "gates": {}, "grad_norm": None, "horizon": None,
        }
        where = ("layers", len(layers))
        module.groups[(*where, "units")] = ([(*where, "units")], units.tolist(), rank)
        chosen = torch.where(keep, hidden.index_select(-1, units.to(device)), 0.0)
        module.arrays[(*where, "hidden")] = (_host(chosen, steps), (*where, "units"))
        if record.gates:
            gates = {g: v[i].index_select(0, index) for g, v in record.gates.items()}
            group = (*where, "units")
            module.groups[group][0].append((*where, "gate_units"))
            gate_units = units
            if next(iter(gates.values())).shape[-1] != total:  # a projected LSTM: gates of hidden_size
                gate_units, gate_rank = _largest(sum(_variance(v, mask) for v in gates.values()), max_units)
                group = (*where, "gate_units")
                module.groups[(*where, "units")][0].pop()
                module.groups[group] = ([group], gate_units.tolist(), gate_rank)
            for gate, values in gates.items():
                entry["gates"][gate] = None
                module.arrays[(*where, "gates", gate)] = (
                    _host(torch.where(keep, values.index_select(-1, gate_units.to(device)), 0.0), steps), group)
        if norms is not None:
            norm = norms[i][rows] * mask.cpu()  # (K, T), zero at padding
            module.arrays[(*where, "grad_norm")] = (_host(norm, steps), None)
            module.lists[(*where, "horizon")] = _horizon_steps(horizons[i][rows], lengths, direction == 1)
        layers.append(entry)
    if bounded:
        total = record.hidden.shape[-1]
        notes.append(f"{name!r} hidden: the {max_units} of {total} units with the largest variance over the probe "
                     f"set's valid steps, per layer and direction ({', '.join(bounded)}), listed in \"units\"")
    module.lists[("lengths",)] = [int(n) for n in lengths.tolist()]
    return module


def _horizon_steps(counts: torch.Tensor, lengths: torch.Tensor, reverse: bool) -> list[int | None]:
    """Per sequence, the step where ``||dL/dh_t||``, followed back from the last step its direction
    processes, first falls below 1 % of its peak, from :func:`sequence_horizons`' counts; ``None`` where it
    never does or the sequence has no usable gradient."""
    out: list[int | None] = []
    for count, length in zip(counts.tolist(), lengths.tolist()):
        if not np.isfinite(count) or int(count) >= length:
            out.append(None)
        else:
            out.append(int(count) if reverse else int(length - 1 - count))
    return out


def _attention(name: str, record: AttentionRecord, rows: list[int], steps: int) -> _Module:
    index = torch.tensor(rows, device=record.device)
    weights = record.attention.index_select(0, index)  # (K, H, Tq, Tk)
    queries, keys = int(weights.shape[-2]), int(weights.shape[-1])
    if record.key_lengths is not None:
        key_lengths = record.key_lengths.cpu()[rows]
        real = torch.arange(keys).unsqueeze(0) < key_lengths.unsqueeze(1)  # (K, Tk)
        weights = torch.where(real.to(weights.device)[:, None, None, :], weights, 0.0)
        key_list = [int(n) for n in key_lengths.tolist()]
    else:
        key_list = [keys] * len(rows)
    self_attention = record.query_is_key is not False and queries == keys
    query_list = [min(n, queries) for n in key_list] if self_attention else [queries] * len(rows)
    fields = {"type": "attention", "name": name, "kind": record.kind, "exact": bool(record.exact),
              "heads": int(weights.shape[1]), "weights": None,
              # only where the record knows its query was its key: a square map of an extractor may be a
              # cross-attention (a decoder's steps over the encoder's)
              "tokens_are_steps": bool(record.query_is_key is True and queries == steps)}
    module = _Module(fields)
    module.arrays[("weights",)] = (np.ascontiguousarray(weights.detach().float().cpu().numpy()), None)
    module.lists.update({("query_lengths",): query_list, ("key_lengths",): key_list})
    return module
