"""Turning a finished capture into records (:class:`RNNRecord`, :class:`AttentionRecord`), on any thread.

Each call of a fused RNN is replayed step by step on a graph of our own (:func:`replay_rnn`) for its gates,
its lower layers' states and the total ``dL/dh_t``, with its inter-layer dropout replayed from the masks
drawn at the hand-off, and checked against what the call returned; the calls of a chain (each from the last
one's final state) are laid end to end. Cells' steps and attention weights are stacked. After the hand-off
nothing here touches anything process-wide, so it may run on a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lightning_rnnviz.probe.attention import allowed_key_counts, key_lengths_from_mask, mha_weights
from lightning_rnnviz.probe.capture import _Call, _same_values, _Session, _version, _Watch
from lightning_rnnviz.probe.records import AttentionRecord, Recording, RNNRecord
from lightning_rnnviz.probe.replay import (
    LayerWeights,
    ReplayResult,
    cell_gates,
    largest_relative_error,
    replay_rnn,
    replay_with_dropout,
)
from lightning_rnnviz.probe.targets import ATTENTION_TYPES, FUSED_TYPES

GradScale = float | Tensor | Callable[[], float | Tensor] | None


def _choose_calls(calls: list[_Call]) -> list[_Call]:
    """Deterministic choice among a block's calls of one module.

    Calls made during a backward pass are activation-checkpointing recomputations; they are used only
    when no forward call received a gradient but one of them did (reentrant checkpointing).
    """
    forward = [c for c in calls if not c.in_backward]
    recompute = [c for c in calls if c.in_backward]
    if not any(c.grads for c in forward) and any(c.grads for c in recompute):
        return recompute
    return forward or recompute


def _last_call(calls: list[_Call]) -> _Call:
    """The last call whose outputs received a gradient, else the last call."""
    chosen = _choose_calls(calls)
    with_grad = [c for c in chosen if c.grads]
    return (with_grad or chosen)[-1]


def _is_chain(module: nn.RNNBase, calls: list[_Call]) -> bool:
    """Whether a fused module's calls are one recurrence: a unidirectional module whose every call starts
    from the previous call's final state (an encoder whose state starts the decoder, as in DeepAR; a
    decoder that calls ``nn.GRU`` once per output step)."""
    if module.bidirectional or any(c.in_backward for c in calls):
        return False
    if not all(c.data["follows"] for c in calls[1:]):
        return False
    return len({c.data["batch"] for c in calls}) == 1


# How far a replay may be from what the module returned, relative (``|a - b| / (1 + |b|)``), by the dtype
# the module's kernel computed in: the replay computes in float32 (float64 for a float64 module), so under
# autocast the module's own rounding is what differs. cuDNN allowed TF32 (``torch.backends.cudnn.allow_tf32``,
# on by default) computes float32 with 10-bit mantissas.
CHECK_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
TF32_TOLERANCE = 2e-2


def _final_state(data: dict[str, Any]) -> tuple[Tensor, Tensor | None] | None:
    """The call's ``(h_n, c_n)`` as it returned them: owned copies after a hand-off, else the references
    while not changed in place; ``None`` when unknown."""
    if "final_state" in data:
        return data["final_state"]
    state = data.get("state_out")
    if state is None:
        return None
    h_n, h_version, c_n, c_version = state
    if h_version is None or _version(h_n) != h_version or (c_n is not None and _version(c_n) != c_version):
        return None
    return h_n, c_n


def _first_entries(parts: list[_Replayed], starts: Tensor | None) -> Tensor:
    """The calls' first steps where a gradient entered, on the record's time axis (``-1``: none)."""
    if len(parts) == 1:
        return parts[0].direct_from
    found = torch.full_like(parts[0].direct_from, -1)
    for part, start in zip(parts, starts):
        here = torch.where(part.direct_from >= 0, start + part.direct_from, -1)
        found = torch.where((found < 0) | ((here >= 0) & (here < found)), here, found)
    return found


def _direct_from(module: nn.RNNBase, g_out: Tensor | None, g_hn: Tensor | None, g_cn: Tensor | None,
                 lengths: Tensor) -> Tensor:
    """``(B,)``: the first step of each sequence where a gradient entered the forward direction from outside
    the module (its output at that step, or ``h_n``/``c_n`` at its last step), ``-1`` where none did."""
    dirs = 2 if module.bidirectional else 1
    batch = lengths.shape[0]
    first = torch.full((batch,), -1, dtype=torch.long)
    if g_out is not None:
        width = g_out.shape[-1] // dirs
        entered = (g_out[..., :width] != 0).any(-1).cpu()  # (T, B)
        hit = entered.any(0)
        first = torch.where(hit, entered.to(torch.uint8).argmax(0), first)
    at_end = torch.zeros(batch, dtype=torch.bool)
    for g in (g_hn, g_cn):
        if g is not None:
            at_end |= (g[0::dirs] != 0).flatten(2).any(-1).any(0).cpu()
    last = (lengths - 1).clamp(min=0)
    return torch.where(at_end & ((first < 0) | (last < first)), last, first)


def _final_steps(states: Tensor, lengths: Tensor, dirs: int) -> Tensor:
    """``(L*D, B, X)``: each row's state where its direction ended, from ``(L*D, T, B, X)``."""
    index = (lengths.clamp(min=1) - 1).to(states.device).view(1, 1, -1, 1)
    ends = states.gather(1, index.expand(states.shape[0], 1, -1, states.shape[-1])).squeeze(1)
    if dirs == 1:
        return ends
    reverse = (torch.arange(states.shape[0], device=states.device) % 2 == 1).view(-1, 1, 1)
    return torch.where(reverse, states[:, 0], ends)


def _checked(module: nn.RNNBase, data: dict[str, Any], result: ReplayResult, lengths: Tensor,
             true_lengths: Tensor | None, unbatched: bool, input_grad: Tensor | None) -> tuple[str, ...]:
    """The replay of one call against what the call returned: the top layer's states against their own
    recurrence (when they are the module's output), every layer's final states against ``h_n`` and
    ``c_n`` (sequences of length 0, whose final state is not the kernel's, left out) and, where the input
    required a gradient, the replay's ``dL/dx`` against ``input_grad``, what autograd delivered to the
    input through the call (relative to its largest value, within ten times the tolerance). ``()`` when it
    matches; else a note that says what differed, by how much, and within what."""
    dtype, tf32 = data.get("precision", (torch.float32, False))
    tolerance = TF32_TOLERANCE if tf32 else CHECK_TOLERANCES.get(dtype, CHECK_TOLERANCES[torch.float32])
    differed = []
    if result.top_residual is not None:
        residual = float(result.top_residual)
        if not residual <= tolerance:  # NaN fails
            differed.append(f"its output (off by {residual:.2g})")
    final = _final_state(data)
    if final is not None:
        batch = result.hidden.shape[2]
        dirs = 2 if module.bidirectional else 1
        for label, states, given in (("h_n", result.hidden, final[0]), ("c_n", result.cell, final[1])):
            if states is None or given is None:
                continue
            given = given.unsqueeze(1) if unbatched else given
            given = given[:, :batch].to(states.device, states.dtype)
            keep = None if true_lengths is None else (true_lengths > 0).to(states.device).view(1, -1, 1)
            worst = float(largest_relative_error(_final_steps(states, lengths, dirs), given, keep))
            if not worst <= tolerance:
                differed.append(f"`{label}` (off by {worst:.2g})")
    if input_grad is not None and result.input_grad is not None:
        replayed = result.input_grad
        given = input_grad.to(replayed.device, replayed.dtype)
        scale = float(given.abs().nan_to_num(0, 0, 0).amax()) if given.numel() else 0.0
        same = (replayed == given) | (replayed.isnan() & given.isnan())
        off = (replayed - given).abs_().masked_fill_(same, 0).nan_to_num_(float("inf"))
        worst = float(off.amax()) / max(scale, torch.finfo(given.dtype).tiny) if off.numel() else 0.0
        if not worst <= 10 * tolerance:
            differed.append(f"the gradient of its input (off by {worst:.2g} of its largest value)")
    if not differed:
        return ()
    precision = "TF32" if tf32 else str(dtype).removeprefix("torch.")
    return (f"The replay did not reproduce {' and '.join(differed)} within {tolerance:g} ({precision}): the "
            "module may process its input otherwise than its call shows (a subclass that packs it under a "
            "keyword of its own, say), so these states and gradients are not exact.",)


def _dropout_note(p: float, reason: str) -> str:
    """One sentence, short enough for a figure's subtitle, on why a dropout record is approximate."""
    because = {
        "cuda": f"On CUDA, cuDNN draws the inter-layer dropout masks (p={p}) inside the library",
        "differs": f"The inter-layer dropout replay (p={p}) did not give the module's output bit for bit",
        "in_place": f"The output changed in place or is an inference tensor, so the dropout replay (p={p}) "
                    "is unchecked",
        "no_state": f"The generator state at the call is unknown, so the dropout (p={p}) cannot be replayed",
    }[reason]
    return f"{because}: layers above 0 and all gradients are computed without dropout."


@dataclass
class _Replayed:
    """The replay of one call of a fused module, time-major (see ``ReplayResult``)."""

    result: ReplayResult
    lengths: Tensor
    notes: tuple[str, ...]
    # (B,) on the CPU: the first step where a gradient entered the forward direction from outside, -1 if none
    direct_from: Tensor | None = None


class _Builder:
    """The records of one capture, built once its block is over (see
    :meth:`~lightning_rnnviz.probe.Capture.finish`)."""

    def __init__(self, session: _Session, own_flags: bool = True) -> None:
        self.probe = session.probe
        self.max_samples = session.max_samples
        self.watches = session.watches
        self.own_flags = own_flags  # whether finishing may switch TF32 off for the replay (not from a worker)

    def _placed(self, t: Tensor) -> Tensor:
        """Where a record keeps ``t``: on the CPU, or on its own device with ``Probe(on_device=True)``."""
        return t if self.probe.on_device else t.cpu()

    def finalize(self, recording: Recording, grad_scale: GradScale) -> None:
        scale = grad_scale() if callable(grad_scale) else grad_scale
        scale = None if scale is None else float(scale)
        for name, watch in self.watches.items():
            if watch.failed is None and watch.calls:
                try:
                    record = self._build(watch, scale)
                except Exception as error:  # noqa: BLE001
                    self.probe._fail(watch, error, "replay")
                else:
                    if record is not None:
                        recording.records[name] = record
            if watch.failed is not None:
                recording.errors[name] = watch.failed

    def _build(self, watch: _Watch, scale: float | None) -> RNNRecord | AttentionRecord | None:
        module = watch.module
        if watch.name in self.probe.extractors or isinstance(module, ATTENTION_TYPES):
            return self._build_attention(watch)
        if isinstance(module, FUSED_TYPES):
            return self._build_fused(watch, self._fused_calls(watch), scale)
        return self._build_cell(watch, _choose_calls(watch.calls), scale)

    def _fused_calls(self, watch: _Watch) -> list[_Call]:
        """The calls a fused module's record shows: one call, or every call of a chain of single steps."""
        wanted = self.probe.call
        if wanted is not None:
            forward = [c for c in watch.calls if not c.in_backward]
            if not -len(forward) <= wanted < len(forward):
                raise ValueError(
                    f"`call`={wanted} is out of range: module {watch.name!r} was called "
                    f"{len(forward)} time(s) in this block (forward calls, 0-based, negative from the end)"
                )
            return [forward[wanted]]
        calls = _choose_calls(watch.calls)
        if len(calls) > 1 and _is_chain(watch.module, calls):
            return calls
        call = _last_call(calls)
        if len(calls) > 1:
            shown = next(i for i, c in enumerate(calls) if c is call)
            self.probe._warn_calls(watch.name, shown, len(calls), bool(call.grads))
        return [call]

    def _build_attention(self, watch: _Watch) -> AttentionRecord:
        if watch.name in self.probe.extractors:
            parts = [c.data["attention"] for c in watch.calls]
            weights = self._placed((torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]).float())
            # No masks are known: the keys a query may attend to are those it gives any weight.
            counts = (weights > 0).sum(-1)
            counts = None if bool((counts == weights.shape[-1]).all()) else counts
            return AttentionRecord(watch.name, "custom", weights, key_counts=counts)
        call = watch.calls[-1]
        if "mha" in call.data:
            _recompute_mha(call.data)
        weights = self._placed(call.data["attention"].float())
        counts = call.data["key_counts"]  # on the CPU, from the masks
        kind = call.data.get("kind", "MultiheadAttention")
        return AttentionRecord(watch.name, kind, weights, call.data["key_lengths"],
                               key_counts=None if counts is None else counts.to(weights.device),
                               query_is_key=call.data.get("query_is_key"))

    def _build_fused(self, watch: _Watch, calls: list[_Call], scale: float | None) -> RNNRecord:
        """One call replayed, or the calls of a chain (each from the last one's final state) replayed one by
        one and laid end to end on each sequence's time axis: its valid steps of one call, then those of
        the next. Each call's replay takes the gradient its own outputs received, which for a final state
        that started the next call holds everything the later steps sent back: the total ``dL/dh_t``."""
        module: nn.RNNBase = watch.module  # type: ignore[assignment]
        parts = [self._replay_call(module, call, scale) for call in calls]
        results = [part.result for part in parts]
        rows, batch = results[0].hidden.shape[0], results[0].hidden.shape[2]
        lengths = parts[0].lengths
        starts = None
        if len(parts) > 1:
            each = torch.stack([part.lengths for part in parts])  # (calls, B)
            starts = torch.cumsum(each, 0) - each
            lengths = each.sum(0)
        total = int(lengths.max()) if len(parts) > 1 else results[0].hidden.shape[1]

        def laid(tensors: list[Tensor | None]) -> Tensor | None:
            if all(t is None for t in tensors):
                return None
            if len(tensors) == 1:
                return tensors[0]
            like = next(t for t in tensors if t is not None)
            # one slot past the end takes every padded step, and is dropped
            out = like.new_zeros(rows, total + 1, batch, like.shape[-1])
            for t, start, n in zip(tensors, starts, each):
                if t is None:
                    continue  # a call whose outputs received no gradient: zero
                step = torch.arange(t.shape[1]).unsqueeze(1)
                where = torch.where(step < n, start + step, total).to(t.device)
                out.scatter_(1, where.view(1, *where.shape, 1).expand_as(t), t)
            return out[:, :total]

        gates = {k: laid([r.gates[k] for r in results]) for k in results[0].gates}

        def out(t: Tensor | None) -> Tensor | None:
            return None if t is None else self._placed(t.transpose(1, 2).float()).contiguous()

        notes = tuple(dict.fromkeys(note for part in parts for note in part.notes))
        pool = [c for c in watch.calls if not c.in_backward] or watch.calls
        shown = tuple(i for i, c in enumerate(pool) if any(c is call for call in calls))
        context = []
        several_steps = any(r.hidden.shape[1] > 1 for r in results)
        if len(parts) > 1 and several_steps:
            sizes = " + ".join(str(int(part.lengths.max())) for part in parts)
            context.append(f"calls {shown[0] + 1}-{shown[-1] + 1} of {len(pool)} as one sequence, each from the "
                           f"last one's final state ({sizes} steps)")
        elif len(pool) > 1 and len(parts) == 1:
            context.append(f"call {shown[0] + 1} of {len(pool)}")
        feeds = calls[-1].data.get("feeds")
        if feeds is not None:
            context.append(f"its final state starts {feeds!r}: the gradient at its last steps comes through it")
        return RNNRecord(
            name=watch.name,
            kind=module.mode,
            hidden=out(laid([r.hidden for r in results])),
            gates={k: out(v) for k, v in gates.items()},
            hidden_grad=out(laid([r.hidden_grad for r in results])),
            cell=out(laid([r.cell for r in results])),
            cell_grad=out(laid([r.cell_grad for r in results])),
            lengths=lengths,
            num_layers=module.num_layers,
            num_directions=2 if module.bidirectional else 1,
            exact=not notes,
            notes=notes,
            grad_enabled=any(call.data["grad_enabled"] for call in calls),
            calls=(shown, len(pool)),
            call_starts=starts if len(parts) > 1 and several_steps else None,
            context=tuple(context),
            direct_from=_first_entries(parts, starts),
            feeds=feeds,
        )

    def _replay_call(self, module: nn.RNNBase, call: _Call, scale: float | None) -> _Replayed:
        data, upstream = call.data, call.grads
        true_lengths = None
        if data.get("packing") is not None:
            data, upstream, true_lengths = self._as_packed_call(module, data, upstream)
        weights = data["weights"]
        dtype = torch.float64 if next(iter(weights.values())).dtype == torch.float64 else torch.float32
        inp = data["input"]
        lengths = None
        packed_layout = data["output"]
        if isinstance(inp, PackedSequence):
            x, lengths = pad_packed_sequence(inp)
            unbatched = False
        else:
            unbatched = inp.dim() == 2
            x = inp.unsqueeze(1) if unbatched else (inp.transpose(0, 1) if module.batch_first else inp)
        device = next(iter(weights.values())).device
        x = x.to(device, dtype)
        steps, batch = x.shape[:2]
        dirs = 2 if module.bidirectional else 1
        rows = module.num_layers * dirs
        proj = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
        is_lstm = module.mode == "LSTM"

        hx = data["hx"]
        h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        if h0 is None:
            h0 = x.new_zeros(rows, batch, proj)
        if is_lstm and c0 is None:
            c0 = x.new_zeros(rows, batch, module.hidden_size)
        if unbatched:
            h0 = h0.unsqueeze(1) if h0.dim() == 2 else h0
            c0 = c0.unsqueeze(1) if c0 is not None and c0.dim() == 2 else c0

        grads = {k: g.to(device, dtype) / (scale or 1.0) for k, g in upstream.items()}
        def time_major(t: Tensor, packed: PackedSequence | None) -> Tensor:
            """A tensor laid out as the call's input or output was, time-major ``(T, B, ...)``."""
            if packed is not None:
                return pad_packed_sequence(packed._replace(data=t), total_length=steps)[0]
            if unbatched:
                return t.unsqueeze(1)
            return t.transpose(0, 1) if module.batch_first else t

        g_out = grads.get("output")
        g_out = None if g_out is None else time_major(g_out, packed_layout)
        g_hn, g_cn = grads.get("h_n"), grads.get("c_n")
        if unbatched:
            g_hn = g_hn.unsqueeze(1) if g_hn is not None else None
            g_cn = g_cn.unsqueeze(1) if g_cn is not None else None

        h0 = h0.to(device, dtype)
        c0 = c0.to(device, dtype) if c0 is not None else None
        cast = {n: w.to(dtype) for n, w in weights.items()}
        layer_weights = [
            [LayerWeights.from_flat(cast, layer, d) for d in range(dirs)]
            for layer in range(module.num_layers)
        ]
        values, version = data["output_values"]
        unchanged = version is not None and _version(values) == version
        states = masks = None
        notes: tuple[str, ...] = ()
        if data["training"] and module.dropout > 0 and module.num_layers > 1:
            # The masks depend on the whole batch: drawn again on the full batch, sliced afterwards.
            states, masks, note = self._dropout_replay(module, data, x, h0, c0, unchanged)
            notes = () if note is None else (note,)
        if self.max_samples is not None and self.max_samples < batch:
            k = self.max_samples
            x, h0 = x[:, :k], h0[:, :k]
            c0 = c0[:, :k] if c0 is not None else None
            g_out = g_out[:, :k] if g_out is not None else None
            g_hn = g_hn[:, :k] if g_hn is not None else None
            g_cn = g_cn[:, :k] if g_cn is not None else None
            lengths = lengths[:k] if lengths is not None else None
            states = [t[:, :k] for t in states] if states is not None else None
            masks = [t[:, :k] for t in masks] if masks is not None else None
            batch = k

        top = None
        # Without the masks, the module's output is not the top layer of the replayed network.
        if unchanged and not notes:
            top = time_major(values, packed_layout)[:, :batch].to(device, dtype)
        # lengths stay on the CPU, where packing needs them: a copy back from the device would wait for it
        g_in = grads.get("input")
        if g_in is not None:
            # what autograd delivered to the input through this call (the padded input of a subclass that
            # packed it itself), time-major like the replay's
            g_in = time_major(g_in, inp if true_lengths is None and packed_layout is not None else None)
            g_in = g_in[:steps, :batch]
        result = replay_rnn(module.mode, layer_weights, x, h0, c0, lengths, g_out, g_hn, g_cn,
                            top_states=top, layer_states=states, dropout_masks=masks,
                            user_flags=not self.own_flags, input_grad=g_in is not None)
        if lengths is None:
            lengths = torch.full((batch,), steps, dtype=torch.long)
        if true_lengths is not None:
            true_lengths = true_lengths[:batch]
        if not notes:
            # "exact" only when checked: the replay against what this call of the module really returned
            notes = _checked(module, data, result, lengths.cpu(), true_lengths, unbatched, g_in)
        shown = (lengths if true_lengths is None else true_lengths).cpu()
        return _Replayed(result, shown, notes, _direct_from(module, g_out, g_hn, g_cn, shown))

    @staticmethod
    def _as_packed_call(module: nn.RNNBase, data: dict[str, Any], upstream: dict[Any, Tensor]
                        ) -> tuple[dict[str, Any], dict[Any, Tensor], Tensor]:
        """A call of a subclass that packed its padded input with ``lengths`` inside its own ``forward`` (see
        :func:`capture._packing_lengths`), as the packed call of the fused kernel it made there: the input,
        the output's values and its gradient packed as it packed them (sequences of length 0 as one step, in
        its order, so the dropout masks fall where the kernel drew them), and the upstream gradient of
        ``h_n``/``c_n`` zero for sequences of length 0, whose returned final state is the initial one and
        not the kernel's. Returns the call's data so viewed, its upstream gradients and the true lengths."""
        lengths, enforce_sorted = data["packing"]
        lengths = lengths.cpu()
        if not bool((lengths > 0).any()):
            raise ValueError("every sequence of the call had length 0: the module ran no step")
        stepped = lengths.clamp(min=1)

        def pack(t: Tensor) -> PackedSequence:
            return pack_padded_sequence(t, stepped, batch_first=module.batch_first, enforce_sorted=enforce_sorted)

        inp = pack(data["input"])
        view = dict(data, input=inp, packing=None,
                    output=PackedSequence(torch.empty(0), inp.batch_sizes, inp.sorted_indices, inp.unsorted_indices))
        values, version = data["output_values"]
        unchanged = version is not None and _version(values) == version
        view["output_values"] = (pack(values).data, 0) if unchanged else (values, None)
        grads = dict(upstream)
        if "output" in grads:
            grads["output"] = pack(grads["output"]).data
        empty = (lengths == 0).to(next(iter(grads.values())).device) if grads else None
        for key in ("h_n", "c_n"):
            if key in grads and bool((lengths == 0).any()):
                grads[key] = grads[key].masked_fill(empty.view(1, -1, 1), 0)
        return view, grads, lengths

    def _dropout_replay(
        self,
        module: nn.RNNBase,
        data: dict[str, Any],
        x: Tensor,
        h0: Tensor,
        c0: Tensor | None,
        unchanged: bool,
    ) -> tuple[list[Tensor] | None, list[Tensor] | None, str | None]:
        """States of the layers below the top and the inter-layer dropout masks of one call in training mode,
        each ``(T, B, D*P)`` for the full batch, or a note on why they are not known.

        The masks are drawn again from the CPU generator's state at the call and kept only when the
        replayed top layer equals the module's output bit for bit.
        """
        p = module.dropout
        if x.device.type != "cpu":
            return None, None, _dropout_note(p, "cuda")
        if data["rng_state"] is None:
            return None, None, _dropout_note(p, "no_state")
        if not unchanged:
            return None, None, _dropout_note(p, "in_place")
        values = data["output_values"][0]
        inp = data["input"]
        # The same tensors as at the call, as far as the kernels can tell: layout and requires_grad
        # (aliases of our copies, so the flags stay off what the rest of the replay reads).
        flags = data["requires_grad"]
        flat = {n: w.to(x.dtype).detach().requires_grad_(flags[n]) for n, w in data["weights"].items()}
        dirs = 2 if module.bidirectional else 1
        weights = [[LayerWeights.from_flat(flat, layer, d) for d in range(dirs)]
                   for layer in range(module.num_layers)]
        input_grad, hx_grad = data["input_requires_grad"]
        h0 = h0.detach().requires_grad_(bool(hx_grad) and hx_grad[0])
        if c0 is not None:
            c0 = c0.detach().requires_grad_(len(hx_grad) > 1 and hx_grad[1])
        if isinstance(inp, PackedSequence):
            # In the module's own layout: the kernel drew the masks on the packed data, in the user's order.
            order = inp.sorted_indices
            if order is not None:
                h0 = h0.index_select(1, order.to(h0.device))
                c0 = c0.index_select(1, order.to(c0.device)) if c0 is not None else None
            data_in = inp.data.to(x.device, x.dtype).detach().requires_grad_(input_grad)
            replay = replay_with_dropout(module.mode, weights, data_in, h0, c0, p, data["rng_state"],
                                         inp.batch_sizes, grad_enabled=data["grad_enabled"],
                                         masks=data.get("dropout_masks"))
            top = values

            def padded(t: Tensor) -> Tensor:
                return pad_packed_sequence(inp._replace(data=t), total_length=x.shape[0])[0]
        else:
            # As the module received it: its own layout, an unbatched input with the batch axis it adds.
            given = inp.unsqueeze(0 if module.batch_first else 1) if inp.dim() == 2 else inp
            given = given.to(x.device, x.dtype).detach().requires_grad_(input_grad)
            replay = replay_with_dropout(module.mode, weights, given, h0, c0, p, data["rng_state"],
                                         batch_first=module.batch_first, grad_enabled=data["grad_enabled"],
                                         masks=data.get("dropout_masks"))
            if inp.dim() == 2:
                top = values.unsqueeze(1)
            else:
                top = values.transpose(0, 1) if module.batch_first else values

            def padded(t: Tensor) -> Tensor:
                return t
        if not _same_values(replay.outputs[-1], top):
            return None, None, _dropout_note(p, "differs")
        return [padded(t) for t in replay.outputs[:-1]], [padded(m) for m in replay.masks], None

    def _build_cell(self, watch: _Watch, calls: list[_Call], scale: float | None) -> RNNRecord:
        module: nn.RNNCellBase = watch.module  # type: ignore[assignment]
        kind = type(module).__name__

        def batched(t: Tensor) -> Tensor:
            return t.unsqueeze(0) if t.dim() == 1 else t

        sizes = {batched(c.data["x"]).shape[0] for c in calls}
        if len(sizes) > 1:
            raise ValueError(f"the cell was called with varying batch sizes {sorted(sizes)} in one block")
        k = self.max_samples
        x = torch.stack([batched(c.data["x"])[:k] for c in calls]).float()  # (calls, B, I)
        h = torch.stack([batched(c.data["h"])[:k] for c in calls]).float()
        h_prev = torch.stack(
            [torch.zeros_like(h[0]) if c.data["h_prev"] is None else batched(c.data["h_prev"])[:k].float() for c in calls]
        )
        cell = torch.stack([batched(c.data["c"])[:k] for c in calls]).float() if kind == "LSTMCell" else None
        mode = {"LSTMCell": "LSTM", "GRUCell": "GRU"}.get(kind, "RNN")
        gate_rows = []
        with torch.no_grad():
            for i, c in enumerate(calls):
                if i == 0 or c.data["weights"] is not calls[i - 1].data["weights"]:
                    w = c.data["weights"]
                    lw = LayerWeights(
                        w["weight_ih"].float(), w["weight_hh"].float(),
                        w["bias_ih"].float() if "bias_ih" in w else None,
                        w["bias_hh"].float() if "bias_hh" in w else None,
                    )
                gate_rows.append(cell_gates(mode, x[i], h_prev[i], lw))
        gates = {g: torch.stack([row[g] for row in gate_rows]) for g in gate_rows[0]} if gate_rows[0] else {}

        def grads(key: str, like: Tensor) -> Tensor | None:
            if not any(key in c.grads for c in calls):
                return None
            rows = [batched(c.grads[key])[:k].float() if key in c.grads else torch.zeros_like(like[0]) for c in calls]
            g = torch.stack(rows)
            return g / scale if scale else g

        def out(t: Tensor | None) -> Tensor | None:
            return None if t is None else self._placed(t.transpose(0, 1).unsqueeze(0)).contiguous()

        hidden = out(h)
        return RNNRecord(
            name=watch.name,
            kind=kind,
            hidden=hidden,
            gates={g: out(v) for g, v in gates.items()},
            hidden_grad=out(grads("h", h)),
            cell=out(cell),
            cell_grad=out(grads("c", cell)) if cell is not None else None,
            lengths=torch.full((hidden.shape[1],), hidden.shape[2], dtype=torch.long),
            grad_enabled=any(c.data["grad_enabled"] for c in calls),
        )


def _recompute_mha(data: dict[str, Any]) -> None:
    """An ``nn.MultiheadAttention`` call's per-head weights and key counts, recomputed from the copies its
    capture took (:meth:`~lightning_rnnviz.probe.capture._Session._mha_inputs`), here where the recording is
    finished: on the recording worker where there is one, not on the training thread."""
    module, (q, k, v, kpm, mask), is_causal, params = data.pop("mha")
    batched = q.dim() == 3
    with torch.autocast(q.device.type, enabled=False):
        weights = mha_weights(module, q, k, v, kpm, mask, is_causal, params)
    if kpm is not None and not batched:
        kpm = kpm.unsqueeze(0)
    extra = int(module.bias_k is not None) + int(module.add_zero_attn)
    data.update(attention=weights, key_counts=allowed_key_counts(weights.shape, kpm, mask, is_causal, extra),
                key_lengths=key_lengths_from_mask(None if extra else kpm, batched=True))
