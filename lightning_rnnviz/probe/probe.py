"""``Probe``: record hidden states, gates, exact per-step gradients and attention of a model's modules.

On a recording, forward hooks keep each target module's inputs (detached) and a snapshot of its weights,
and tensor hooks on its outputs catch the upstream gradient of the user's own backward. When the block
exits, fused RNNs are replayed step by step on a graph of our own to get gates, lower layers' states and
the total ``dL/dh_t``; attention weights are recomputed per head without dropout. Hooks exist only
inside the block and never change a value: the training run is bit-identical with and without it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils.hooks import RemovableHandle

from lightning_rnnviz.probe import held
from lightning_rnnviz.probe.attention import (
    allowed_key_counts,
    blocked_key_counts,
    encoder_layer_step,
    key_lengths_from_mask,
    mha_weights,
)
from lightning_rnnviz.probe.known import KnownAttention, head_count, known_attention
from lightning_rnnviz.probe.records import AttentionRecord, Recording, RNNRecord
from lightning_rnnviz.probe.replay import (
    LayerWeights,
    ReplayResult,
    cell_gates,
    draw_dropout_masks,
    relative_error,
    replay_rnn,
    replay_with_dropout,
)
from lightning_rnnviz.probe.targets import (
    ATTENTION_TYPES,
    CELL_TYPES,
    FUSED_TYPES,
    extractor_form,
    resolve_targets,
    unreadable_attention,
)

Extractor = Callable[[nn.Module, tuple, Any], Tensor]
GradScale = float | Tensor | Callable[[], float | Tensor] | None


class RNNVizWarning(UserWarning):
    """A capture or render step failed; the run goes on without that picture."""


def _in_backward() -> bool:
    """True while autograd is running a backward pass (e.g. activation checkpointing recomputes)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}


def _version(tensor: Tensor) -> int | None:
    """The tensor's in-place version counter; ``None`` for inference tensors, which keep none."""
    return None if tensor.is_inference() else tensor._version


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


@dataclass
class _Call:
    """One call of a watched module during a recording."""

    in_backward: bool
    grads: dict[Any, Tensor] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Watch:
    """Everything a recording keeps for one module."""

    name: str
    module: nn.Module
    calls: list[_Call] = field(default_factory=list)
    failed: str | None = None
    # CPU generator states taken by the forward pre-hook, each popped by its call's forward hook
    rng_states: list[Tensor | None] = field(default_factory=list)


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


def _same_values(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None) == (b is None) and (
        a is None
        or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    )


def _follows(previous: _Call | None, hx: Any, compare: bool) -> bool:
    """Whether ``hx`` holds the final state of ``previous``, not changed since: the very tensors, or with
    ``compare`` (a one-step call) equal values."""
    if previous is None or hx is None or "state_out" not in previous.data:
        return False
    h, c = hx if isinstance(hx, tuple) else (hx, None)
    h_n, h_version, c_n, c_version = previous.data["state_out"]
    if _version(h_n) != h_version or (c_n is not None and _version(c_n) != c_version):
        return False
    if _same_tensor(h, h_n) and (c_n is None or _same_tensor(c, c_n)):
        return True
    return compare and _same_values(h, h_n) and _same_values(c, c_n)


def _same_tensor(a: Tensor | None, b: Tensor) -> bool:
    """The same values in the same memory (``b`` a detached alias of ``a``, or ``a`` itself)."""
    return (isinstance(a, Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.stride() == b.stride() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset())


# Most autograd nodes the walk of :func:`_edges_into` visits on the training thread (1-3 us each): a fused
# call has a few; PyTorch runs a packed sequence on the CPU as steps, some 18 nodes a step, layer and
# direction (pytorch-forecasting's 2-layer LSTM over 24 steps: 843 nodes, 0.8 ms; over 60: 1,923, 1.9 ms),
# and a longer one is left unchecked rather than walked (a 2-layer bidirectional LSTM over 500 steps: 165 ms).
EDGE_WALK_LIMIT = 2048
_NODES_PER_PACKED_STEP = 18


def _walkable(module: nn.RNNBase, inp: Any, data: dict[str, Any], steps: int | None) -> bool:
    """Whether the call's graph is small enough to walk: not a packed sequence run as steps on the CPU whose
    steps x layers x directions would take it past :data:`EDGE_WALK_LIMIT` nodes (known without walking)."""
    packing = data.get("packing")
    packed = isinstance(inp, PackedSequence) or packing is not None
    tensor = inp.data if isinstance(inp, PackedSequence) else inp
    if not packed or tensor.device.type != "cpu":
        return True
    if isinstance(inp, PackedSequence):
        steps = len(inp.batch_sizes)
    rows = module.num_layers * (2 if module.bidirectional else 1)
    return _NODES_PER_PACKED_STEP * (steps or 0) * rows <= EDGE_WALK_LIMIT


def _edges_into(inp: Tensor, hx: Any, roots: list[Tensor | None]) -> list[tuple[Any, int]] | None:
    """The autograd edges through which a call's outputs ``roots`` send their gradient to its input ``inp``:
    ``(node, index)`` for each node of the call's own graph whose ``index``-th next function is ``inp``'s.
    The walk goes back from the outputs and stops at the input, at the initial state (a path through
    ``hx`` is not the kernel's), at leaves, and at nodes older than the input (made before the call);
    ``None`` past :data:`EDGE_WALK_LIMIT` nodes."""
    target = torch.autograd.graph.get_gradient_edge(inp)
    stop = {target.node}
    for h in hx if isinstance(hx, tuple) else (hx,):
        if isinstance(h, Tensor) and h.requires_grad:
            stop.add(torch.autograd.graph.get_gradient_edge(h).node)
    floor = inp.grad_fn._sequence_nr() if inp.grad_fn is not None else -1
    edges, seen = [], set()
    todo = [t.grad_fn for t in roots if isinstance(t, Tensor) and t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > EDGE_WALK_LIMIT:
            return None
        for index, (following, number) in enumerate(node.next_functions):
            if following is None:
                continue
            if following is target.node and number == target.output_nr:
                edges.append((node, index))
            elif (following not in stop and following not in seen and following.next_functions
                  and following._sequence_nr() > floor):
                todo.append(following)
    return edges


_PLAIN_FORWARDS = frozenset({nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward})


@functools.lru_cache(maxsize=64)
def _forward_signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None


def _packing_lengths(module: nn.RNNBase, args: tuple, kwargs: dict) -> tuple[Tensor, bool] | None:
    """``(lengths, enforce_sorted)`` when a subclass of a fused module was called with a ``lengths`` argument,
    as pytorch-forecasting's ``LSTM``/``GRU`` are: they pack the padded input inside their own ``forward``
    (``lengths`` 0 packed as 1 step), call the fused kernel on the packed sequence and pad its output again,
    which hooks on ``__call__`` cannot see. ``None`` for the plain modules and any other call."""
    forward = type(module).forward
    if forward in _PLAIN_FORWARDS:
        return None
    signature = _forward_signature(type(module))
    if signature is None or "lengths" not in signature.parameters:
        return None
    try:
        bound = signature.bind(module, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    lengths = bound.arguments.get("lengths")
    names = list(signature.parameters)
    inp = bound.arguments.get(names[1]) if len(names) > 1 else None
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or not isinstance(inp, Tensor) or inp.dim() != 3:
        return None
    return lengths.detach(), bool(bound.arguments.get("enforce_sorted", True))


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
            error = relative_error(_final_steps(states, lengths, dirs), given)
            if true_lengths is not None:
                error = error[:, (true_lengths > 0).to(error.device)]
            worst = float(error.amax()) if error.numel() else 0.0
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


_EXPECTED_WEIGHTS = (
    "non-negative weights (batch, [heads,] T_out, T_in), or (batch, T_in) for one decoding step, whose rows "
    "(last axis) sum to 1"
)


def _checked_weights(
    extractor: Extractor, name: str, weights: Any, earlier: tuple[int, int, int] | None,
    module: nn.Module | None = None, known: tuple[KnownAttention, Tensor] | None = None,
) -> Tensor:
    """What an extractor returned, as ``(batch, heads, T_out, T_in)``, if it is attention weights.

    Args:
        module: the module, whose head count (``num_heads``, ``n_head``, ``n_heads``, ...) a 4-d result
            must have on axis 1.
        known: for a class lightning_rnnviz reads without an extractor, its entry and the weights the
            module returned, turned to ``(batch, heads, T_out, T_in)``: a result equal to them with axes 1
            and 2 swapped is wrong even where heads and queries are as many.

    Raises:
        ValueError: naming the extractor, the module, the shape returned and what was wrong: not a
            floating-point tensor of 2-4 dimensions, a 4-d result whose axis 1 is not the module's head
            count or that is the known weights transposed (the message names the expected axes and
            suggests ``.transpose(1, 2)`` where that fits), negative values, rows (last axis) that do
            not sum to 1 (within 1e-3, or 2e-2 for 16-bit floats; rows holding NaN, as fully masked
            rows do, are not checked), or batch, heads or key length unlike an earlier call of the block.
    """
    label = f"the attention extractor `{getattr(extractor, '__qualname__', type(extractor).__qualname__)}`"
    if not isinstance(weights, Tensor):
        raise ValueError(
            f"{label} returned a {type(weights).__name__} for module {name!r}; expected {_EXPECTED_WEIGHTS}"
        )

    def wrong(problem: str) -> ValueError:
        return ValueError(f"{label} returned shape {tuple(weights.shape)} for module {name!r}, {problem}; "
                          f"expected {_EXPECTED_WEIGHTS}")

    if not 2 <= weights.dim() <= 4:
        raise wrong(f"{weights.dim()} dimensions")
    if not weights.is_floating_point():
        raise wrong(f"of dtype {weights.dtype}")
    w = weights.detach()
    if w.dim() == 4 and known is not None:
        entry, returned = known
        swapped = returned.transpose(1, 2)
        if (w.shape == swapped.shape and not (w.shape == returned.shape and torch.equal(w, returned))
                and torch.equal(w, swapped)):
            heads = returned.shape[1]
            raise ValueError(
                f"{label} returned shape {tuple(w.shape)} for module {name!r} ({entry.label}): its weights with "
                f"the heads on axis 2; expected (batch, heads={heads}, T_out, T_in): return "
                "`weights.transpose(1, 2)`, or leave the module out of `attention=`: lightning_rnnviz reads "
                f"this class without an extractor"
            )
    revealed = head_count(module) if module is not None and w.dim() == 4 else None
    if revealed is not None and w.shape[1] != revealed[1]:
        attribute, heads = revealed
        hint = f"; axis 2 has {heads}: return `weights.transpose(1, 2)`" if w.shape[2] == heads else ""
        raise ValueError(
            f"{label} returned shape {tuple(w.shape)} for module {name!r}, whose axis 1 has {w.shape[1]} "
            f"entries, but the module has {attribute}={heads}; expected (batch, heads={heads}, T_out, T_in) "
            f"(or (batch, T_out, T_in) for heads averaged into one){hint}"
        )
    w = w[:, None, None, :] if w.dim() == 2 else w[:, None] if w.dim() == 3 else w
    half = w.element_size() == 2
    rows = w.flatten(0, -2).float() if half else w.flatten(0, -2)
    rows = rows[~torch.isnan(rows).any(-1)]
    if rows.numel() and bool((rows < 0).any()):
        raise wrong(f"with negative values (down to {float(rows.min()):.3g})")
    if rows.numel():
        sums = rows.sum(-1)
        worst = int((sums - 1).abs().argmax())
        if not abs(float(sums[worst]) - 1) <= (2e-2 if half else 1e-3):
            raise wrong(f"whose rows along the last axis sum to {float(sums[worst]):.4g}, not 1")
    if earlier is not None and earlier != (w.shape[0], w.shape[1], w.shape[3]):
        batch, heads, keys = earlier
        raise wrong(f"but an earlier call of this block gave batch {batch}, {heads} head(s) and {keys} keys")
    return w


@dataclass
class _Replayed:
    """The replay of one call of a fused module, time-major (see ``ReplayResult``)."""

    result: ReplayResult
    lengths: Tensor
    notes: tuple[str, ...]
    # (B,) on the CPU: the first step where a gradient entered the forward direction from outside, -1 if none
    direct_from: Tensor | None = None


class Probe:
    """Record what happens inside a model's recurrent and attention modules on one batch.

    Supported: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` (fused, replayed for gates and exact gradients),
    ``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell`` called in a loop (each call is one step; the calls of a fused module that each start from the
    previous call's final state are one sequence, see ``call``),
    ``nn.MultiheadAttention`` (also inside the ``nn.Transformer*Layer`` modules), the Temporal Fusion
    Transformer attention of pytorch-forecasting, darts and neuralforecast (``probe/known.py``: read in
    their own layouts, before dropout, with the keys their masks allowed), and any module with a custom
    attention extractor. With ``modules=None``, a module whose class says attention but that none of these
    reads is named in one warning that shows the ``attention=`` form.

    Args:
        model: the model to watch.
        modules: qualified names (as in ``model.named_modules()``) or fnmatch patterns of the modules to
            record; ``None`` records every supported module.
        attention: ``{name or pattern: fn(module, args, output) -> weights}`` for custom attention
            modules; ``weights`` is ``(batch, [heads,] T_out, T_in)``, or ``(batch, T_in)`` for one
            decoding step. The rows of all calls in a block are stacked in call order. What an
            extractor returns is checked: non-negative, each row (last axis) summing to 1 (within 1e-3,
            2e-2 for 16-bit floats; rows of NaN, fully masked, pass), the same batch, heads and key
            length in every call of a block; a 4-d result has the module's head count (``num_heads``,
            ``n_head``, ``n_heads``) on axis 1, and is not a known class's weights transposed. Anything else
            (a context vector, transposed weights) is
            an error of capture: one warning naming the extractor, the module and the shape, and that
            module's record is dropped for the block.
        strict: re-raise errors from capture and replay instead of warning once and dropping that
            module's record (for tests).
        call: which call of a fused ``nn.RNN/LSTM/GRU`` a record shows when the module is called several
            times in one block: an index among the block's forward calls (0-based, negative from the
            end). ``None`` records the calls as one sequence when each starts from the previous call's
            final state (an encoder whose state starts its decoder, laid end to end on each sequence's
            time axis; a decoder that calls ``nn.GRU`` once per output step; unidirectional modules
            only; see ``RNNRecord.calls`` and ``call_starts``); otherwise it shows the last call whose outputs
            received a gradient, else the last call, and warns once which one it shows. An index past
            a block's calls drops that module's record for the block (as an error of capture).
        on_device: leave the records' tensors on the device where each module ran instead of copying
            them to the CPU (``lengths`` and ``key_lengths`` are on the CPU either way). The callbacks
            use it so that statistics, histograms and picture payloads are reduced on the GPU and only
            their small results cross to the host; :meth:`Recording.cpu` copies a recording over.

    Raises:
        ValueError: a name or pattern matches no module (the message lists those that exist), names a
            module of an unsupported type, or the model has no supported module; ``call`` is not an int
            or ``None``.

    Example::

        >>> import torch
        >>> from lightning_rnnviz import Probe
        >>> model = torch.nn.LSTM(input_size=3, hidden_size=8, num_layers=2, batch_first=True)
        >>> x = torch.randn(4, 10, 3)
        >>> with Probe(model).record() as rec:
        ...     output, (h_n, c_n) = model(x)
        ...     output[:, -1].sum().backward()
        >>> r = rec[""]  # the root module's name
        >>> r.hidden.shape, r.hidden_grad.shape, r.grad_norm.shape
        (torch.Size([2, 4, 10, 8]), torch.Size([2, 4, 10, 8]), torch.Size([2, 10]))
        >>> bool(r.grad_norm[1, 0] > 0)  # many-to-one loss, yet the first step gets its true gradient
        True
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str] | None = None,
        attention: Mapping[str, Extractor] | None = None,
        strict: bool = False,
        call: int | None = None,
        on_device: bool = False,
    ) -> None:
        if call is not None and (isinstance(call, bool) or not isinstance(call, int)):
            raise ValueError(
                f"`call` must be an int (0-based index of a module's forward call in a block, negative from "
                f"the end) or None (the last call that received a gradient), got {call!r}."
            )
        self.call = call
        self.on_device = bool(on_device)
        self.model = model
        self.targets, extractor_keys = resolve_targets(model, modules, attention)
        self.extractors: dict[str, Extractor] = {n: attention[k] for n, k in extractor_keys.items()}
        self.strict = strict
        self.error_counts: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._encoder_layers = self._find_encoder_layers(model)
        # attention classes of other libraries read without an extractor (known.py)
        self.known: dict[str, KnownAttention] = {
            n: entry for n, m in self.targets.items()
            if n not in self.extractors and (entry := known_attention(type(m))) is not None
        }
        if modules is None:
            readable = [n for n, m in self.targets.items() if n in self.extractors or isinstance(m, ATTENTION_TYPES)]
            unread = unreadable_attention(model, readable)
            if unread:
                self._warn_unreadable(model, unread)

    @staticmethod
    def _warn_unreadable(model: nn.Module, names: list[str]) -> None:
        """One warning for the modules whose class says attention but that nothing can read."""
        named = dict(model.named_modules())
        listed = [f"{n!r} ({type(named[n]).__name__})" for n in names[:4]]
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        which = f"module {listed[0]}" if len(names) == 1 else f"modules {', '.join(listed)}{more}"
        keys = "" if len(names) == 1 else " (a key may be an fnmatch pattern that names several)"
        held.warn(
            f"lightning_rnnviz does not record {which}: the class looks like attention, but it is not "
            "`nn.MultiheadAttention` nor an attention class lightning_rnnviz knows. To record it, give an "
            f"extractor of its weights, {extractor_form(names[0])}{keys} (`Probe(attention=...)`, "
            "`RNNViz(attention=...)`).",
            RNNVizWarning,
            stacklevel=3,
            where=held.where(model, names[0]),
        )

    def _find_encoder_layers(self, model: nn.Module) -> dict[str, tuple[nn.TransformerEncoderLayer, str | None, int]]:
        """Watched ``self_attn`` of encoder layers: ``name -> (layer, enclosing encoder's name, index)``.

        An encoder layer in eval mode may take PyTorch's fused fast path, which it takes only while no
        forward hook sits on it or its children; such layers are recorded from the enclosing
        ``nn.TransformerEncoder`` instead (see :meth:`_Session.attach`).
        """
        named = dict(model.named_modules())
        found = {}
        for name, module in named.items():
            if not isinstance(module, nn.TransformerEncoder):
                continue
            for index, layer in enumerate(module.layers):
                child = f"{name}.layers.{index}.self_attn" if name else f"layers.{index}.self_attn"
                if child in self.targets and child not in self.extractors:
                    found[child] = (layer, name, index)
        for name, module in named.items():
            child = f"{name}.self_attn" if name else "self_attn"
            if isinstance(module, nn.TransformerEncoderLayer) and child in self.targets and child not in found:
                if child not in self.extractors:
                    found[child] = (module, None, -1)
        return found

    @contextlib.contextmanager
    def record(self, max_samples: int | None = None, grad_scale: GradScale = None) -> Iterator[Recording]:
        """Watch the modules inside this block; the recording is filled when the block exits.

        Args:
            max_samples: keep only the first ``max_samples`` sequences of the batch (and replay only
                those); gradients stay exact since sequences do not interact inside a module.
            grad_scale: the loss scale of a ``GradScaler`` (a number, a tensor or a function returning
                one, read when the block exits): recorded gradients are divided by it.

        Yields:
            A :class:`Recording`, empty until the block exits.
        """
        recording = Recording()
        with self.capture(max_samples) as captured:
            yield recording
        captured.finish(grad_scale, into=recording)

    @contextlib.contextmanager
    def capture(self, max_samples: int | None = None) -> Iterator[Capture]:
        """:meth:`record` in two parts, for a caller that finishes the recording on another thread: the
        hooks exist inside this block only, and what they caught is finished into a :class:`Recording`
        later by :meth:`Capture.finish`, after :meth:`Capture.hand_off` on this thread.

        Args:
            max_samples: as for :meth:`record`.

        Yields:
            The :class:`Capture` of the block.
        """
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"`max_samples` must be a positive int or None, got {max_samples!r}.")
        session = _Session(self, max_samples)
        try:
            session.attach()
            yield Capture(session)
        finally:
            session.detach()

    def _skip(self, watch: _Watch, reason: str) -> None:
        watch.failed = f"not recorded: {reason}"
        if watch.name not in self._warned:
            self._warned.add(watch.name)
            held.warn(f"lightning_rnnviz does not record module {watch.name!r} here ({reason}).",
                      RNNVizWarning, stacklevel=4, where=held.where(self.model, watch.name))

    def _warn_calls(self, name: str, shown: int, total: int, with_grad: bool) -> None:
        """Once per module: several calls that are not one chain of steps; say which one is shown."""
        key = f"{name}\0calls"
        if key in self._warned:
            return
        self._warned.add(key)
        which = "the last whose output received a gradient"
        if not with_grad:
            which = "the last (none received a gradient)"
        held.warn(
            f"lightning_rnnviz: module {name!r} was called {total} times in one recording, not as a chain (each "
            f"call from the last one's final state), so its record shows call {shown + 1} of {total}, {which}. Choose another with "
            "`call=` (`RNNViz(call=...)`, `Probe(call=...)`: 0-based among the forward calls, negative from the end).",
            RNNVizWarning,
            stacklevel=2,
            where=held.where(self.model, name),
        )

    def _fail(self, watch: _Watch, error: BaseException, where: str) -> None:
        self.error_counts[watch.name] += 1
        watch.failed = f"{type(error).__name__}: {error}"
        if self.strict:
            raise error
        if watch.name not in self._warned:
            self._warned.add(watch.name)
            held.warn(
                f"lightning_rnnviz could not {where} module {watch.name!r} ({watch.failed}); its record "
                "is dropped and training goes on. Further errors of this module are counted in "
                "`Probe.error_counts`. Pass `strict=True` to raise instead.",
                RNNVizWarning,
                stacklevel=2,
                where=held.where(self.model, watch.name),
            )


class Capture:
    """What the hooks of one :meth:`Probe.capture` block caught, to be finished into a :class:`Recording`.

    The two steps split where a recording may change threads. :meth:`hand_off`, on the training thread
    right after the block, makes what the capture holds its own: copies of the tensors it only referenced
    (the user may reuse or change them once training goes on), and the inter-layer dropout masks drawn
    from the generator states taken at the calls (only that thread may touch the global generator).
    :meth:`finish` then replays and builds the records on any thread, touching nothing process-wide.
    """

    def __init__(self, session: _Session) -> None:
        self._session = session
        self.handed_off = False

    def hand_off(self) -> list[Tensor]:
        """Copy what is referenced, draw the dropout masks; the tensors the capture now holds (a caller that
        finishes on another CUDA stream marks them used there)."""
        self.handed_off = True
        return self._session.hand_off()

    def finish(self, grad_scale: GradScale = None, into: Recording | None = None) -> Recording:
        """Replay and build every record (see :meth:`Probe.record` for ``grad_scale``). After
        :meth:`hand_off` nothing process-wide is touched: the replay leaves TF32 as the user set it, which
        a module's own kernels used too, and the dropout masks were drawn already."""
        recording = Recording() if into is None else into
        self._session.finalize(recording, grad_scale, own_flags=not self.handed_off)
        return recording


class _Session:
    """The hooks and captured data of one ``record()`` block."""

    def __init__(self, probe: Probe, max_samples: int | None) -> None:
        self.probe = probe
        self.max_samples = max_samples
        self.watches = {n: _Watch(n, m) for n, m in probe.targets.items()}
        self.handles: list[RemovableHandle] = []
        self.own_flags = True  # whether finishing may switch TF32 off for the replay (not from a worker)

    def _placed(self, t: Tensor) -> Tensor:
        """Where a record keeps ``t``: on the CPU, or on its own device with ``Probe(on_device=True)``."""
        return t if self.probe.on_device else t.cpu()

    # --- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        encoders: dict[str, list[str]] = {}
        for name, watch in self.watches.items():
            module = watch.module
            if name in self.probe.extractors:
                hook = self._extractor_hook(watch)
            elif name in self.probe.known:
                hook = self._known_hook(watch)
            elif isinstance(module, FUSED_TYPES):
                hook = self._fused_hook(watch)
                if module.dropout > 0 and module.num_layers > 1:
                    pre_hook = module.register_forward_pre_hook(self._rng_hook(watch), with_kwargs=True)
                    self.handles.append(pre_hook)
            elif isinstance(module, CELL_TYPES):
                hook = self._cell_hook(watch)
            else:
                layer_info = self.probe._encoder_layers.get(name)
                if layer_info is not None and not layer_info[0].training:
                    # In eval mode the layer may take its fused fast path, which any hook on the layer
                    # or its children switches off, changing the user's output in the last bits.
                    if layer_info[1] is not None:
                        encoders.setdefault(layer_info[1], []).append(name)
                    else:
                        self.probe._skip(watch, "a standalone `nn.TransformerEncoderLayer` in eval mode: a hook "
                                         "would turn off its fused fast path; put it in an "
                                         "`nn.TransformerEncoder` to record it")
                    continue
                hook = self._mha_hook(watch)
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        named = dict(self.probe.model.named_modules())
        for encoder_name, names in encoders.items():
            hook = self._encoder_hook([self.watches[n] for n in names])
            self.handles.append(named[encoder_name].register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _guarded(self, watch: _Watch, where: str, fn: Callable[[], None]) -> None:
        if watch.failed is not None:
            return
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - never let our capture break the user's step
            self.probe._fail(watch, error, where)

    def _grad_hook(self, watch: _Watch, call: _Call, key: Any) -> Callable[[Tensor | None], None]:
        def hook(grad: Tensor | None) -> None:
            def keep() -> None:
                if grad is None:
                    return
                g = grad.detach()
                call.grads[key] = call.grads[key] + g if key in call.grads else g.clone()

            self._guarded(watch, "capture the gradient of", keep)
            # Returning None keeps the user's gradient untouched.

        return hook

    def _input_grad_hook(self, watch: _Watch, call: _Call, index: int) -> Callable:
        """A hook on a node of the call's graph: the gradient it sends to the call's input, summed."""

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            grad = grad_inputs[index]
            if grad is not None:
                self._guarded(watch, "capture the input gradient of",
                              lambda: call.grads.__setitem__("input", call.grads["input"] + grad.detach()
                                                             if "input" in call.grads else grad.detach().clone()))
            # Returning None keeps autograd's gradients untouched.

        return hook

    def _watch_grad(self, watch: _Watch, call: _Call, tensor: Tensor | None, key: Any) -> None:
        if tensor is not None and tensor.requires_grad:
            self.handles.append(tensor.register_hook(self._grad_hook(watch, call, key)))

    def _rng_hook(self, watch: _Watch) -> Callable:
        """Forward pre-hook: the CPU generator's state just before the call, from which the fused kernel
        draws its inter-layer dropout masks (``get_rng_state`` copies it and draws nothing)."""

        def hook(module: nn.RNNBase, args: tuple, kwargs: dict) -> None:
            def snapshot() -> None:
                inp = _arg(args, kwargs, 0, "input")
                data = inp.data if isinstance(inp, PackedSequence) else inp
                on_cpu = isinstance(data, Tensor) and data.device.type == "cpu"
                watch.rng_states.append(torch.get_rng_state() if module.training and on_cpu else None)

            self._guarded(watch, "capture", snapshot)

        return hook

    def _fused_hook(self, watch: _Watch) -> Callable:
        def hook(module: nn.RNNBase, args: tuple, kwargs: dict, output: Any) -> None:
            def capture() -> None:
                inp = _arg(args, kwargs, 0, "input")
                hx = _arg(args, kwargs, 1, "hx")
                out, hidden = output
                call = _Call(in_backward=_in_backward())
                inp_requires_grad = (inp.data if isinstance(inp, PackedSequence) else inp).requires_grad
                hx_requires_grad = tuple(h.requires_grad for h in (hx if isinstance(hx, tuple) else (hx,))
                                         if h is not None)
                previous = next((c for c in reversed(watch.calls) if not c.in_backward), None)
                if isinstance(inp, PackedSequence):
                    steps, batch = None, int(inp.batch_sizes[0])
                elif inp.dim() == 2:
                    steps, batch = inp.shape[0], 1
                else:
                    steps, batch = (inp.shape[1], inp.shape[0]) if module.batch_first else inp.shape[:2]
                call.data.update(
                    rng_state=watch.rng_states.pop() if watch.rng_states else None,
                    single_step=steps == 1,
                    batch=batch,
                    # does this call start where the last ended (an encoder's state starting the decoder, a
                    # decoder calling the module once per step)?
                    follows=not call.in_backward and _follows(previous, hx, compare=steps == 1),
                    # the lengths a packing subclass packed with inside its own forward
                    packing=_packing_lengths(module, args, kwargs),
                )
                given_input = inp.data if isinstance(inp, PackedSequence) else inp
                hx_given = hx
                if isinstance(inp, PackedSequence):
                    inp = PackedSequence(inp.data.detach(), inp.batch_sizes, inp.sorted_indices, inp.unsorted_indices)
                else:
                    inp = inp.detach()
                if isinstance(hx, tuple):
                    hx = tuple(h.detach() for h in hx)
                elif hx is not None:
                    hx = hx.detach()
                call.data.update(
                    input=inp,
                    hx=hx,
                    weights=_snapshot(module),
                    training=module.training,
                    grad_enabled=torch.is_grad_enabled(),
                    # what the kernels' rounding depends on, for a replay that must match bit for bit
                    requires_grad={n: p.requires_grad for n, p in module.named_parameters(recurse=False)},
                    input_requires_grad=(inp_requires_grad, hx_requires_grad),
                )
                if not call.data["follows"] and hx is not None and not call.in_backward:
                    # a module whose final state starts this one (TFT's encoder and decoder LSTMs)
                    for other in self.watches.values():
                        last = other.calls[-1] if other is not watch and other.calls else None
                        if last is not None and "state_out" in last.data and _follows(last, hx, compare=False):
                            last.data["feeds"] = watch.name
                watch.calls.append(call)
                h_n, c_n = hidden if isinstance(hidden, tuple) else (hidden, None)
                # The final state (references, no copy), to tell whether the next call starts from it.
                call.data["state_out"] = (h_n.detach(), _version(h_n), None if c_n is None else c_n.detach(),
                                          None if c_n is None else _version(c_n))
                out_tensor = out.data if isinstance(out, PackedSequence) else out
                # what the check of the replay against the call's outputs allows for: the dtype the kernel
                # computed in (autocast's, where on) and whether cuDNN could use TF32
                call.data["precision"] = (out_tensor.dtype, out_tensor.device.type == "cuda"
                                          and out_tensor.dtype == torch.float32
                                          and torch.backends.cudnn.allow_tf32)
                self._watch_grad(watch, call, out_tensor, "output")
                self._watch_grad(watch, call, h_n, "h_n")
                self._watch_grad(watch, call, c_n, "c_n")
                if inp_requires_grad and not call.in_backward and _walkable(module, inp, call.data, steps):
                    # what autograd delivers to the input through this call, to check the replay's dL/dx
                    for node, index in _edges_into(given_input, hx_given, [out_tensor, h_n, c_n]) or ():
                        self.handles.append(node.register_hook(self._input_grad_hook(watch, call, index)))
                # The packing layout of the output, to unpack its gradient later.
                call.data["output"] = (
                    PackedSequence(torch.empty(0), out.batch_sizes, out.sorted_indices, out.unsorted_indices)
                    if isinstance(out, PackedSequence)
                    else None
                )
                # The output itself (a reference, no copy) gives the top layer's states without a replay
                # forward, unless something changes it in place before the block closes (version check).
                call.data["output_values"] = (out_tensor.detach(), _version(out_tensor))

            self._guarded(watch, "capture", capture)

        return hook

    def _cell_hook(self, watch: _Watch) -> Callable:
        def hook(module: nn.RNNCellBase, args: tuple, kwargs: dict, output: Any) -> None:
            def capture() -> None:
                x = _arg(args, kwargs, 0, "input")
                hx = _arg(args, kwargs, 1, "hx")
                h, c = output if isinstance(output, tuple) else (output, None)
                if isinstance(hx, tuple):
                    hx = hx[0]
                versions = tuple(p._version for p in module.parameters(recurse=False))
                previous = watch.calls[-1].data if watch.calls else None
                weights = (
                    previous["weights"]
                    if previous is not None and previous["versions"] == versions
                    else _snapshot(module)
                )
                call = _Call(in_backward=_in_backward())
                call.data.update(
                    x=x.detach(),
                    h_prev=None if hx is None else hx.detach(),
                    h=h.detach(),
                    c=None if c is None else c.detach(),
                    weights=weights,
                    versions=versions,
                    grad_enabled=torch.is_grad_enabled(),
                )
                watch.calls.append(call)
                self._watch_grad(watch, call, h, "h")
                self._watch_grad(watch, call, c, "c")

            self._guarded(watch, "capture", capture)

        return hook

    def _sliced(self, t: Tensor, dim: int) -> Tensor:
        return t if self.max_samples is None else t.narrow(dim, 0, min(self.max_samples, t.shape[dim]))

    def _store_attention(self, watch: _Watch, weights: Tensor, key_padding_mask: Tensor | None,
                         key_counts: Tensor | None = None, query_is_key: bool | None = None) -> None:
        call = _Call(in_backward=False)
        call.data.update(attention=weights, key_lengths=key_lengths_from_mask(key_padding_mask, batched=True),
                         key_counts=key_counts, query_is_key=query_is_key)
        watch.calls.append(call)

    def _mha_recompute(self, module: nn.MultiheadAttention, q, k, v, kpm, mask, is_causal, watch: _Watch):
        query_is_key = q is k
        batched = q.dim() == 3
        if batched and self.max_samples is not None:
            dim = 0 if module.batch_first else 1
            q, k, v = (self._sliced(t, dim) for t in (q, k, v))
            kpm = None if kpm is None else self._sliced(kpm, 0)
            if mask is not None and mask.dim() == 3:
                mask = mask[: q.shape[dim] * module.num_heads]
        with torch.autocast(q.device.type, enabled=False):
            weights = mha_weights(module, q, k, v, kpm, mask, is_causal)
        if kpm is not None and not batched:
            kpm = kpm.unsqueeze(0)
        extra = int(module.bias_k is not None) + int(module.add_zero_attn)
        counts = allowed_key_counts(weights.shape, kpm, mask, is_causal, extra)
        self._store_attention(watch, weights, None if extra else kpm, counts, query_is_key)

    def _mha_hook(self, watch: _Watch) -> Callable:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
            if _in_backward():
                return  # a checkpointing recomputation: same weights as the forward call

            def capture() -> None:
                q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
                kpm = _arg(args, kwargs, 3, "key_padding_mask")
                mask = _arg(args, kwargs, 5, "attn_mask")
                is_causal = bool(_arg(args, kwargs, 7, "is_causal", False))
                self._mha_recompute(module, q, k, v, kpm, mask, is_causal, watch)

            self._guarded(watch, "capture", capture)

        return hook

    def _encoder_hook(self, watches: list[_Watch]) -> Callable:
        """Follow an encoder's eval-mode layers from its input to get each watched layer's attention."""
        by_index = {self.probe._encoder_layers[w.name][2]: w for w in watches}
        last = max(by_index)

        def hook(encoder: nn.TransformerEncoder, args: tuple, kwargs: dict, output: Any) -> None:
            if _in_backward():
                return
            training = [i for i, layer in enumerate(encoder.layers) if i <= last and layer.training]
            if training:
                for watch in by_index.values():
                    self.probe._skip(watch, f"layer {training[0]} of its encoder is in training mode while "
                                     "the watched layer is in eval mode; its dropout cannot be replayed")
                return
            x = _arg(args, kwargs, 0, "src")
            mask = _arg(args, kwargs, 1, "mask")
            kpm = _arg(args, kwargs, 2, "src_key_padding_mask")
            is_causal = bool(_arg(args, kwargs, 3, "is_causal", False))
            for index, layer in enumerate(encoder.layers):
                if index > last:
                    break
                x, weights = encoder_layer_step(layer, x, mask, kpm, is_causal)
                if index in by_index:
                    self._guarded(by_index[index], "capture",
                                  lambda w=by_index[index], a=weights: self._store_encoder_attention(
                                      w, self._sliced(a, 0), mask, kpm, is_causal))

        return hook

    def _store_encoder_attention(self, watch: _Watch, weights: Tensor, mask: Tensor | None,
                                 kpm: Tensor | None, is_causal: bool) -> None:
        counts = allowed_key_counts(weights.shape, kpm, mask, is_causal)
        self._store_attention(watch, weights, self._sliced(kpm, 0) if kpm is not None else None, counts, True)

    def _extractor_hook(self, watch: _Watch) -> Callable:
        extractor = self.probe.extractors[watch.name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if _in_backward():
                return

            def capture() -> None:
                earlier = watch.calls[-1].data["extracted"] if watch.calls else None
                known = None
                if (entry := known_attention(type(module))) is not None:
                    with contextlib.suppress(Exception):  # a layout not as known: the other checks apply
                        known = (entry, entry.returned(module, args, kwargs, output))
                w = _checked_weights(extractor, watch.name, extractor(module, args, output), earlier, module, known)
                self._store_attention(watch, self._sliced(w, 0), None)
                watch.calls[-1].data["extracted"] = (w.shape[0], w.shape[1], w.shape[3])

            self._guarded(watch, "capture", capture)

        return hook

    def _known_hook(self, watch: _Watch) -> Callable:
        """An attention class of another library (known.py): the weights it returned (recomputed from its
        parameters where it returns them after dropout), and the keys its mask allowed."""
        entry = self.probe.known[watch.name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if _in_backward():
                return  # a checkpointing recomputation: same weights as the forward call

            def capture() -> None:
                weights, blocked = entry.read(module, args, kwargs, output, self.max_samples)
                self._store_attention(watch, weights, None, blocked_key_counts(blocked, weights.shape))
                watch.calls[-1].data["kind"] = type(module).__name__

            self._guarded(watch, "capture", capture)

        return hook

    # --- after the block -------------------------------------------------------------------------
    def hand_off(self) -> list[Tensor]:
        """See :meth:`Capture.hand_off`."""
        held: list[Tensor] = []

        def own(t: Any) -> Any:
            if isinstance(t, PackedSequence):
                return t._replace(data=own(t.data))
            if isinstance(t, tuple):
                return tuple(own(u) for u in t)
            if isinstance(t, Tensor):
                t = t.clone()
                held.append(t)
            return t

        for watch in self.watches.values():
            if watch.failed is not None:
                continue
            for call in watch.calls:
                data = call.data
                state = data.pop("state_out", None)
                if state is not None:
                    # the call's final state, unless changed in place since, to check the replay against
                    h_n, h_version, c_n, c_version = state
                    same = _version(h_n) == h_version and (c_n is None or _version(c_n) == c_version)
                    data["final_state"] = (own(h_n), own(c_n)) if same and h_version is not None else None
                if data.get("packing") is not None:
                    lengths, enforce_sorted = data["packing"]
                    data["packing"] = (own(lengths), enforce_sorted)
                for key in ("input", "hx", "x", "h_prev", "h", "c", "attention"):
                    if key in data:
                        data[key] = own(data[key])
                if "output_values" in data:
                    values, version = data["output_values"]
                    unchanged = version is not None and _version(values) == version
                    data["output_values"] = (own(values), 0) if unchanged else (values, None)
                if data.get("rng_state") is not None:
                    self._guarded(watch, "capture", lambda d=data, m=watch.module: self._draw_masks(m, d))
                held += call.grads.values()
                held += data.get("weights", {}).values()
        return held

    @staticmethod
    def _draw_masks(module: nn.RNNBase, data: dict[str, Any]) -> None:
        """The call's inter-layer dropout masks, from the generator state taken at the call."""
        inp, dirs = data["input"], 2 if module.bidirectional else 1
        weights = data["weights"]
        dtype = torch.float64 if next(iter(weights.values())).dtype == torch.float64 else torch.float32
        proj = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
        if isinstance(inp, PackedSequence):
            shape: tuple[int, ...] = (inp.data.shape[0], dirs * proj)
        elif data.get("packing") is not None:
            # packed inside the subclass's forward, a length of 0 as one step (the CPU only: on CUDA the
            # generator state is not taken, so reading the lengths never waits for the device)
            shape = (int(data["packing"][0].clamp(min=1).sum()), dirs * proj)
        elif inp.dim() == 2:
            shape = (inp.shape[0], 1, dirs * proj)
        else:
            steps, batch = (inp.shape[1], inp.shape[0]) if module.batch_first else inp.shape[:2]
            shape = (steps, batch, dirs * proj)
        data["dropout_masks"] = draw_dropout_masks([shape] * (module.num_layers - 1), dtype, module.dropout,
                                                   data["rng_state"])

    def finalize(self, recording: Recording, grad_scale: GradScale, own_flags: bool = True) -> None:
        self.own_flags = own_flags
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
        :func:`_packing_lengths`), as the packed call of the fused kernel it made there: the input, the
        output's values and its gradient packed as it packed them (sequences of length 0 as one step, in
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
