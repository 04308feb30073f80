"""What runs on the training thread while a recording is made: the hooks and what they keep.

Inside a :meth:`~lightning_rnnviz.probe.Probe.capture` block, forward hooks keep each watched module's
inputs (detached) and a snapshot of its weights, tensor hooks on its outputs catch the upstream gradient
of the user's own backward, and attention weights are recomputed per head as the calls happen; all of it
is kept per call (:class:`_Call`) and per module (:class:`_Watch`). At the hand-off, still on the training
thread, the capture copies what it only referenced and draws the inter-layer dropout masks. Nothing here
changes a value of the user's; turning a capture into records is :mod:`~lightning_rnnviz.probe.build`'s.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from lightning_rnnviz.probe.attention import (
    allowed_key_counts,
    blocked_key_counts,
    encoder_layer_step,
    key_lengths_from_mask,
)
from lightning_rnnviz.probe.known import KnownAttention, head_count, known_attention
from lightning_rnnviz.probe.replay import draw_dropout_masks
from lightning_rnnviz.probe.targets import CELL_TYPES, FUSED_TYPES

Extractor = Callable[[nn.Module, tuple, Any], Tensor]


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


class _Owner(Protocol):
    """What a capture and its build read of the :class:`~lightning_rnnviz.probe.Probe` that started them:
    its settings, and the methods that report a module dropped or not recorded (once per module)."""

    model: nn.Module
    targets: Mapping[str, nn.Module]
    extractors: Mapping[str, Extractor]
    known: Mapping[str, KnownAttention]
    call: int | None
    on_device: bool
    _encoder_layers: Mapping[str, tuple[nn.TransformerEncoderLayer, str | None, int]]

    def _skip(self, watch: _Watch, reason: str) -> None: ...

    def _warn_calls(self, name: str, shown: int, total: int, with_grad: bool) -> None: ...

    def _fail(self, watch: _Watch, error: BaseException, where: str) -> None: ...


class _Session:
    """The hooks and captured data of one ``capture()`` block (see :class:`~lightning_rnnviz.probe.Capture`),
    and its hand-off."""

    def __init__(self, probe: _Owner, max_samples: int | None) -> None:
        self.probe = probe
        self.max_samples = max_samples
        self.watches = {n: _Watch(n, m) for n, m in probe.targets.items()}
        self.handles: list[RemovableHandle] = []

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

    def _mha_inputs(self, module: nn.MultiheadAttention, q, k, v, kpm, mask, is_causal, watch: _Watch) -> None:
        """What the call's weights are recomputed from when the recording is finished (off the training
        thread, where there is a worker): copies of the recorded rows of its inputs and masks, and of the
        module's parameters (the optimizer step changes them before then). Only copies here, no
        recomputation and nothing that waits for the device."""
        query_is_key = q is k
        batched = q.dim() == 3
        if batched and self.max_samples is not None:
            dim = 0 if module.batch_first else 1
            q, k, v = (self._sliced(t, dim) for t in (q, k, v))
            kpm = None if kpm is None else self._sliced(kpm, 0)
            if mask is not None and mask.dim() == 3:
                mask = mask[: q.shape[dim] * module.num_heads]
        copies: dict[int, Tensor] = {}  # one copy of a tensor given twice (self-attention's query and key)

        def copied(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if id(t) not in copies:
                copies[id(t)] = t.detach().clone()
            return copies[id(t)]

        if watch.calls:  # only the last call is shown: an earlier call's copies go now
            watch.calls[-1].data.pop("mha", None)
        call = _Call(in_backward=False)
        call.data.update(
            mha=(module, tuple(copied(t) for t in (q, k, v, kpm, mask)), is_causal,
                 {n: p.detach().clone() for n, p in module.named_parameters()}),
            query_is_key=query_is_key,
        )
        watch.calls.append(call)

    def _mha_hook(self, watch: _Watch) -> Callable:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
            if _in_backward():
                return  # a checkpointing recomputation: same weights as the forward call

            def capture() -> None:
                q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
                kpm = _arg(args, kwargs, 3, "key_padding_mask")
                mask = _arg(args, kwargs, 5, "attn_mask")
                is_causal = bool(_arg(args, kwargs, 7, "is_causal", False))
                self._mha_inputs(module, q, k, v, kpm, mask, is_causal, watch)

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

    # --- at the hand-off -------------------------------------------------------------------------
    def hand_off(self) -> list[Tensor]:
        """See :meth:`~lightning_rnnviz.probe.Capture.hand_off`."""
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
                if "mha" in data:  # copies already (taken at the call)
                    _, inputs, _, params = data["mha"]
                    held += [t for t in inputs if t is not None] + list(params.values())
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
