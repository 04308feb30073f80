"""Step-by-step replay of fused ``nn.RNN/LSTM/GRU`` modules and vectorised gate recomputation.

A fused module hides its gates, its lower layers' states and the per-step gradients. Replaying it step
by step from the recorded input and weights, on a graph of our own, gives all of them; back-propagating
the upstream gradients the training backward delivered to the module's outputs gives the exact total
``dL/dh_t``. Nothing here touches the user's graph, parameters or ``.grad``.

That backward comes in two forms with the same results: a step-by-step loop (a few small operations a
step and layer, the fastest on the CPU) and one that takes every step's gate pre-activation gradients
from the fused kernel's own backward (a few operations per layer, its recurrences scans of ``log2 T``
vectorised levels: the fastest on a GPU, where the loop is bound by kernel launches); :func:`replay_rnn`
picks by device.

Shapes below use ``T`` time, ``B`` batch, ``I`` input features, ``H`` hidden size, ``P`` the hidden
output size (``proj_size`` for a projected LSTM, else ``H``), ``D`` directions, ``L`` layers.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_rnnviz.probe.records import GRU_GATES, LSTM_GATES


@dataclass
class LayerWeights:
    """The weights of one layer and direction, named as PyTorch names them."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None

    @classmethod
    def from_flat(cls, weights: dict[str, Tensor], layer: int, direction: int) -> LayerWeights:
        """Pick ``weight_ih_l{layer}[_reverse]`` etc. out of a module's flat weights."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        return cls(
            w_ih=weights[f"weight_ih{suffix}"],
            w_hh=weights[f"weight_hh{suffix}"],
            b_ih=weights.get(f"bias_ih{suffix}"),
            b_hh=weights.get(f"bias_hh{suffix}"),
            w_hr=weights.get(f"weight_hr{suffix}"),
        )


@dataclass
class ReplayResult:
    """Per-step quantities of a replay, time-major: first axis ``L*D``, then ``T, B, ...``."""

    hidden: Tensor  # (L*D, T, B, P)
    cell: Tensor | None  # (L*D, T, B, H)
    gates: dict[str, Tensor]  # each (L*D, T, B, H)
    hidden_grad: Tensor | None  # (L*D, T, B, P)
    cell_grad: Tensor | None  # (L*D, T, B, H)
    # Where the top layer's states were given (``top_states``): how far they are from the states that
    # layer's own recurrence gives from them, ``max |h_t - step(x_t, h_{t-1})| / (1 + |h_t|)`` over the
    # valid steps (a 0-d tensor, on the device). Large when the given states are not this layer's on
    # these inputs and lengths, e.g. when a module processed its input otherwise than its hooks saw.
    top_residual: Tensor | None = None
    # ``(T, B, I)``: the total gradient with respect to the module's input (zero at padded steps), when asked
    # for (``input_grad=True``) and any upstream gradient was given.
    input_grad: Tensor | None = None


def lstm_gates(x: Tensor, h_prev: Tensor, w: LayerWeights) -> dict[str, Tensor]:
    """LSTM gate activations from step inputs and previous hidden states, in one vectorised pass.

    Args:
        x: ``(..., I)`` the layer's input at each step.
        h_prev: ``(..., P)`` the hidden state each step started from.
        w: the layer's weights.

    Returns:
        ``input, forget, cell, output`` gates, each ``(..., H)``; ``cell`` is the tanh candidate.
    """
    gates = _gate_preactivations(x, h_prev, w, 4)
    gates[:2].sigmoid_()
    gates[2].tanh_()
    gates[3].sigmoid_()
    return dict(zip(LSTM_GATES, gates.unbind(0)))


# Below this many pre-activations (a step or a few of them) the gates come from one product per weight matrix.
_SMALL_GATES = 1 << 16


def _gate_preactivations(x: Tensor, h_prev: Tensor, w: LayerWeights, count: int,
                         recurrent: int | None = None) -> Tensor:
    """``W_ih x + b_ih + W_hh h_prev + b_hh`` as ``(count, ..., H)``: each gate's pre-activations in a block of
    its own, in one buffer; the recurrent part only in the first ``recurrent`` gates (all by default).

    Each gate contiguous, so the activations run in place on whole blocks: on the CPU an activation of a
    strided slice of the ``(..., count*H)`` product is several times slower than of a contiguous block, and
    every large temporary costs page faults there (the CPU allocator hands large blocks back to the system).
    """
    lead, size = x.shape[:-1], w.w_hh.shape[0] // count
    recurrent = count if recurrent is None else recurrent
    x2, h2 = x.reshape(-1, x.shape[-1]), h_prev.reshape(-1, h_prev.shape[-1])
    if x2.shape[0] * count * size <= _SMALL_GATES:
        # one step's worth: fewer operations matter more than the layout
        pre = F.linear(x2, w.w_ih, w.b_ih)
        b_hh = None if w.b_hh is None else w.b_hh[: recurrent * size]
        pre[:, : recurrent * size] += F.linear(h2, w.w_hh[: recurrent * size], b_hh)
        return pre.unflatten(-1, (count, size)).movedim(-2, 0).contiguous().unflatten(1, lead)
    out = x.new_empty(count, x2.shape[0], size)
    w_ih, w_hh = w.w_ih.unflatten(0, (count, size)), w.w_hh.unflatten(0, (count, size))
    b_ih = None if w.b_ih is None else w.b_ih.unflatten(0, (count, size))
    b_hh = None if w.b_hh is None else w.b_hh.unflatten(0, (count, size))
    for k in range(count):
        if b_ih is None:
            torch.mm(x2, w_ih[k].t(), out=out[k])
        else:
            torch.addmm(b_ih[k], x2, w_ih[k].t(), out=out[k])
        if k >= recurrent:
            continue
        out[k].addmm_(h2, w_hh[k].t())
        if b_hh is not None:
            out[k].add_(b_hh[k])
    return out.unflatten(1, lead)


def gru_gates(x: Tensor, h_prev: Tensor, w: LayerWeights) -> dict[str, Tensor]:
    """GRU gate activations, PyTorch's formula: ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``.

    Args:
        x: ``(..., I)`` the layer's input at each step.
        h_prev: ``(..., H)`` the hidden state each step started from.
        w: the layer's weights.

    Returns:
        ``reset, update, new`` gates, each ``(..., H)``.
    """
    gates = _gate_preactivations(x, h_prev, w, 3, recurrent=2)
    r, z, n = gates.unbind(0)
    gates[:2].sigmoid_()
    size = n.shape[-1]
    h_n = F.linear(h_prev, w.w_hh[2 * size :], None if w.b_hh is None else w.b_hh[2 * size :])
    n.addcmul_(r, h_n).tanh_()
    return dict(zip(GRU_GATES, (r, z, n)))


def cell_gates(mode: str, x: Tensor, h_prev: Tensor, w: LayerWeights) -> dict[str, Tensor]:
    """Gates for ``mode`` (``"LSTM"``, ``"GRU"``, ``"RNN_*"``: no gates, empty dict)."""
    if mode == "LSTM":
        return lstm_gates(x, h_prev, w)
    if mode == "GRU":
        return gru_gates(x, h_prev, w)
    return {}


def replay_rnn(
    mode: str,
    weights: list[list[LayerWeights]],
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None = None,
    lengths: Tensor | None = None,
    grad_output: Tensor | None = None,
    grad_h_n: Tensor | None = None,
    grad_c_n: Tensor | None = None,
    top_states: Tensor | None = None,
    layer_states: list[Tensor] | None = None,
    dropout_masks: list[Tensor] | None = None,
    method: str = "auto",
    user_flags: bool = False,
    input_grad: bool = False,
) -> ReplayResult:
    """Replay a fused RNN layer by layer and, given upstream gradients, compute the total ``dL/dh_t``.

    Each layer's states come from the fused kernel run on that layer alone (so nothing is slower than
    the module's own forward; with ``method="fused"`` and gradients asked for, from the pass whose
    backward gives them, see :class:`_Extended`); gates are recomputed from ``(x_t, h_{t-1})`` in one
    vectorised pass. The total gradients come from back-propagation through time, by ``method``:

    - ``"loop"``: written out per step (one matmul and a few elementwise operations a step, no autograd
      graph);
    - ``"fused"``: each layer runs through the fused kernel with an extra input, on an autograd graph of
      our own, whose backward gives every step's gate pre-activation gradients (see
      :func:`_backward_fused`; the forward of that pass gives the states of a layer whose states are not
      given, equal to the plain kernel's to rounding);
      ``dL/dh_t`` is then one matmul over all steps, the LSTM's ``dL/dc_t`` and the GRU's ``dL/dh_t``
      one elementwise operation a step. TF32 is off for cuDNN and CUDA matmuls meanwhile (the user's
      settings come back afterwards), so the result is that of the module's dtype;
    - ``"auto"``: ``"fused"`` on CUDA, ``"loop"`` elsewhere (the fused kernel's backward on the CPU is
      slower than the loop).

    Steps past a sequence's length are skipped, so the reverse direction starts at each sequence's own
    end, as with a ``PackedSequence``; padded steps are zero in the result.

    Args:
        mode: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
        weights: ``weights[layer][direction]``.
        x: ``(T, B, I)`` the module's input, padded.
        h0: ``(L*D, B, P)`` initial hidden state.
        c0: ``(L*D, B, H)`` initial cell state (LSTM).
        lengths: ``(B,)`` valid lengths, best on the CPU (packing needs them there, so lengths on a GPU are
            copied back, which waits for the device); ``None`` when every sequence has ``T`` steps.
        grad_output: ``(T, B, D*P)`` upstream gradient of the module's output (zero at padded steps).
        grad_h_n: ``(L*D, B, P)`` upstream gradient of ``h_n``.
        grad_c_n: ``(L*D, B, H)`` upstream gradient of ``c_n``.
        top_states: ``(T, B, D*P)`` the module's own output (zero at padded steps): the last layer's
            states, so that layer needs no forward here.
        layer_states: ``L - 1`` tensors ``(T, B, D*P)``, the states of the layers below the top, already
            known (from :func:`replay_with_dropout`): those layers need no forward here either.
        dropout_masks: ``L - 1`` tensors ``(T, B, D*P)``, the factor (``0`` or ``1 / (1 - p)``) that
            inter-layer dropout multiplied each layer's output by before the next layer read it. The
            upper layers read the dropped-out states and the backward goes through the same masks.
        method: ``"auto"``, ``"loop"`` or ``"fused"``, as above.
        user_flags: leave TF32 as the user set it (a replay on a worker beside training must not change
            process-wide flags); the fused path's float32 results are then rounded as the module's own
            kernels were.
        input_grad: also give the gradient with respect to the module's input (``ReplayResult.input_grad``),
            to check the replay against what autograd delivered there.

    Returns:
        The per-step hidden and cell states, gates and, when any upstream gradient is given, the total
        gradients with respect to every hidden (and cell) state.

    Raises:
        ValueError: ``method`` is none of the three.
    """
    method = _chosen_method(method, x.device)
    # Time-major and contiguous: every per-step slice is then one block of memory (a batch-first input or
    # output, transposed, has its rows T*P apart; the factors computed from it inherit that layout).
    x, grad_output, top_states = (_time_major(t) for t in (x, grad_output, top_states))
    layer_states = None if layer_states is None else [_time_major(t) for t in layer_states]
    dropout_masks = None if dropout_masks is None else [_time_major(t) for t in dropout_masks]
    precision = tf32_off() if method == "fused" and not user_flags else contextlib.nullcontext()
    with precision, subnormals_flushed(x.device):
        return _replay(mode, weights, x, h0, c0, lengths, grad_output, grad_h_n, grad_c_n, top_states,
                       layer_states, dropout_masks, method, input_grad)


@contextlib.contextmanager
def subnormals_flushed(device: torch.device) -> Iterator[None]:
    """On the CPU, subnormal floats read and come out as zero on this thread inside the block (the x86
    FTZ/DAZ and AArch64 FZ flags, through ``torch.set_flush_denormal``); the thread's own setting comes
    back afterwards, also when the block raises. Elsewhere nothing changes.

    A gradient that vanishes back through time passes through the subnormal range (below 1.2e-38 in
    float32) on its way to zero, and every CPU operation on subnormal operands is many times slower: at
    T=1000 the backward through time took 2.4x as long. Flushed, those values become the zero they are
    within float32's normal range; every value at or above the smallest normal float is unchanged.
    """
    if device.type != "cpu" or _flushing_subnormals() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _flushing_subnormals() -> bool:
    """Whether this thread already flushes subnormals (PyTorch has no getter): a subnormal float32 made
    and multiplied here comes out zero exactly then."""
    return torch.tensor(1e-39, dtype=torch.float32).mul(1.0).item() == 0.0


def _time_major(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


METHODS = ("auto", "loop", "fused")


def auto_method(device: torch.device) -> str:
    """The backward ``method="auto"`` stands for on ``device``: ``"fused"`` on CUDA, else ``"loop"``."""
    return "fused" if device.type == "cuda" else "loop"


def _chosen_method(method: str, device: torch.device) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {method!r}; "
                         "`'auto'` picks `'fused'` on CUDA and `'loop'` elsewhere.")
    return auto_method(device) if method == "auto" else method


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 off for cuDNN and CUDA matmuls inside the block; whatever the user had comes back afterwards,
    also when the block raises.

    Since torch 2.9 there are two sets of settings: the legacy ones (``torch.backends.cudnn.allow_tf32``,
    ``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision``) and per-operator
    ``fp32_precision`` values. Kernels query either, and a query raises when the two disagree, so inside the
    block both say "no TF32". Every ``fp32_precision`` value and each legacy value are saved (a legacy
    value the user's settings make unreadable is left alone) and restored, legacy first.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    settings = _precision_settings()
    saved = [setting.fp32_precision for setting in settings]
    saved_cudnn = _readable(lambda: cudnn.allow_tf32)
    saved_matmul = _readable(lambda: matmul.allow_tf32)
    # says more than `matmul.allow_tf32` ("medium" or "high"), and is unreadable in more states
    saved_precision = _readable(torch.get_float32_matmul_precision)
    try:
        if saved_cudnn is not None:
            cudnn.allow_tf32 = False
        if saved_precision is not None:
            torch.set_float32_matmul_precision("highest")
        elif saved_matmul is not None:
            matmul.allow_tf32 = False
        for setting in settings:
            if setting in (getattr(cudnn, "rnn", None), getattr(cudnn, "conv", None), matmul):
                setting.fp32_precision = "ieee"
        yield
    finally:
        if saved_cudnn is not None:
            cudnn.allow_tf32 = saved_cudnn
        if saved_precision is not None:
            torch.set_float32_matmul_precision(saved_precision)
        elif saved_matmul is not None:
            matmul.allow_tf32 = saved_matmul
        for setting, value in zip(settings, saved):
            setting.fp32_precision = value


def _precision_settings() -> list:
    """The modules with an ``fp32_precision`` value in this torch, each before those under it."""
    backends = torch.backends
    candidates = [backends, backends.cuda.matmul, backends.cudnn, getattr(backends.cudnn, "rnn", None),
                  getattr(backends.cudnn, "conv", None), backends.mkldnn]
    candidates += [getattr(backends.mkldnn, name, None) for name in ("matmul", "conv", "rnn")]
    return [c for c in candidates if c is not None and hasattr(c, "fp32_precision")]


def _readable(read: Callable[[], object]) -> object | None:
    """``read()``, or ``None`` where it raises (legacy and per-operator settings that disagree)."""
    try:
        return read()
    except RuntimeError:
        return None


def _replay(mode: str, weights: list[list[LayerWeights]], x: Tensor, h0: Tensor, c0: Tensor | None,
            lengths: Tensor | None, grad_output: Tensor | None, grad_h_n: Tensor | None,
            grad_c_n: Tensor | None, top_states: Tensor | None, layer_states: list[Tensor] | None,
            dropout_masks: list[Tensor] | None, method: str, want_input_grad: bool = False) -> ReplayResult:
    num_layers, num_dirs = len(weights), len(weights[0])
    steps = x.shape[0]
    cpu_lengths = None if lengths is None else lengths.cpu()
    if cpu_lengths is not None and not bool((cpu_lengths < steps).any()):
        lengths = cpu_lengths = None
    valid = None
    if lengths is not None:
        lengths = lengths.to(x.device, non_blocking=True)
        valid = (torch.arange(steps, device=x.device).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(-1)
    top_residual = None
    wants_grads = any(g is not None for g in (grad_output, grad_h_n, grad_c_n))
    extended: list[_Extended | None] = [None] * num_layers
    with torch.no_grad():
        layer_inputs, rows = [], []
        layer_in = x
        for layer in range(num_layers):
            layer_inputs.append(layer_in)
            first = layer * num_dirs
            if layer == num_layers - 1 and top_states is not None:
                h_layer = list(top_states.chunk(num_dirs, dim=-1))
            elif layer_states is not None and layer < num_layers - 1:
                h_layer = list(layer_states[layer].chunk(num_dirs, dim=-1))
            elif method == "fused" and wants_grads:
                # the pass whose backward gives this layer's gradients computes its states too
                extended[layer] = _Extended(mode, weights[layer], layer_in, h0[first : first + num_dirs],
                                            None if c0 is None else c0[first : first + num_dirs], cpu_lengths)
                h_layer = extended[layer].states
            else:
                h_layer = _layer_forward(mode, weights[layer], layer_in, h0[first : first + num_dirs],
                                         None if c0 is None else c0[first : first + num_dirs], lengths,
                                         cpu_lengths)
            for direction in range(num_dirs):
                index = first + direction
                h_prev = _previous(h_layer[direction], h0[index], direction, valid)
                rows.append(_Row(mode, weights[layer][direction], direction, layer_in, h_layer[direction],
                                 h_prev, None if c0 is None else c0[index], valid, factors=method == "loop"))
                if layer == num_layers - 1 and top_states is not None:
                    residual = _step_residual(rows[-1], layer_in, h_prev, valid)
                    top_residual = residual if top_residual is None else torch.maximum(top_residual, residual)
                if method == "loop":
                    rows[-1].drop_tanh_c()  # read by the fused path's scans only
            layer_in = h_layer[0] if num_dirs == 1 else torch.cat(h_layer, dim=-1)
            if dropout_masks is not None and layer < num_layers - 1:
                layer_in = layer_in * dropout_masks[layer]

        hidden_grad = cell_grad = input_grad = None
        if wants_grads:
            if method == "loop":
                hidden_grad, cell_grad, input_grad = _backward(rows, num_layers, num_dirs, x, lengths, valid,
                                                               grad_output, grad_h_n, grad_c_n, dropout_masks,
                                                               want_input_grad)
            else:
                hidden_grad, cell_grad, input_grad = _backward_fused(
                    rows, weights, layer_inputs, h0, c0, lengths, valid, grad_output, grad_h_n, grad_c_n,
                    dropout_masks, cpu_lengths, extended)
            input_grad = input_grad if want_input_grad else None

        hidden = _stacked([r.h for r in rows])
        cell = _stacked([r.c for r in rows]) if mode == "LSTM" else None
        gates = {name: _stacked([r.gates[name] for r in rows]) for name in rows[0].gates}
        if valid is not None:
            mask = valid.to(hidden.dtype)
            hidden = hidden.mul_(mask)
            cell = cell.mul_(mask) if cell is not None else None
            gates = {k: v.mul_(mask) for k, v in gates.items()}
    return ReplayResult(hidden, cell, gates, hidden_grad, cell_grad, top_residual, input_grad)


def relative_error(a: Tensor, b: Tensor) -> Tensor:
    """``|a - b| / (1 + |b|)`` elementwise: 0 where both are NaN or equal infinities (a diverged step that
    the replay reproduced), infinite where only one of them is NaN."""
    error = (a - b).abs_().div_(b.abs().add_(1))
    same = (a == b) | (a.isnan() & b.isnan())
    return error.masked_fill_(same, 0).nan_to_num_(nan=float("inf"))


def largest_relative_error(a: Tensor, b: Tensor, keep: Tensor | None = None) -> Tensor:
    """The largest :func:`relative_error` where ``keep`` (a mask broadcast to ``a``; everywhere if ``None``),
    0-d; 0 when there is nothing to compare.

    The plain quotient ``|a - b| / (1 + |b|)`` first: where its largest value is finite there is no NaN or
    infinity for :func:`relative_error` to treat, and the two agree. Only otherwise its special values are
    looked at, in the longer way (the replay's checks read the result on the host anyway).
    """
    if not a.numel():
        return a.new_zeros(())
    error = (a - b).abs_().div_(b.abs().add_(1))
    if keep is not None:
        error.masked_fill_(~keep, 0)
    worst = error.amax()
    if bool(worst.isfinite()):
        return worst
    error = relative_error(a, b)
    if keep is not None:
        error.masked_fill_(~keep, 0)
    return error.amax()


def _step_residual(row: _Row, x: Tensor, h_prev: Tensor, valid: Tensor | None) -> Tensor:
    """``max |h_t - step(x_t, h_{t-1})| / (1 + |h_t|)`` over the valid steps of one layer and direction whose
    states ``row.h`` were given: each step recomputed from the gates (and the LSTM's cell recurrence) of
    this replay."""
    mode, w = row.mode, row.w
    if mode == "LSTM":
        recomputed = row.gates["output"] * row.tanh_c
        if w.w_hr is not None:
            recomputed = F.linear(recomputed, w.w_hr)
    elif mode == "GRU":
        z, n = row.gates["update"], row.gates["new"]
        recomputed = torch.lerp(n, h_prev.to(n.dtype), z)
    else:
        pre = F.linear(x, w.w_ih, w.b_ih) + F.linear(h_prev, w.w_hh, w.b_hh)
        recomputed = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
    return largest_relative_error(recomputed, row.h, valid)


def _stacked(rows: list[Tensor]) -> Tensor:
    """``(L*D, T, B, ...)`` from per-row ``(T, B, ...)`` tensors, in one copy, laid out batch-major: the
    records are ``(L*D, B, T, ...)``, and the probe's transpose of this is then a view, not a second copy."""
    return torch.stack([r.transpose(0, 1) for r in rows]).transpose(1, 2)


_FUSED_OPS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}


@contextlib.contextmanager
def generator_state(state: Tensor) -> Iterator[None]:
    """Run the block from the CPU generator's ``state``; the generator's own state comes back afterwards,
    also when the block raises, so the user's random stream goes on as if nothing had been drawn."""
    saved = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        yield
    finally:
        torch.set_rng_state(saved)


@dataclass
class DropoutReplay:
    """What :func:`replay_with_dropout` gives, in the layout of its input (time-major, or packed data)."""

    outputs: list[Tensor]  # L tensors (T, B, D*P) or (N, D*P): each layer's output before dropout
    masks: list[Tensor]  # L - 1 tensors like outputs: 0 or 1 / (1 - p), what the next layer's input was


def replay_with_dropout(
    mode: str,
    weights: list[list[LayerWeights]],
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    p: float,
    rng_state: Tensor,
    batch_sizes: Tensor | None = None,
    batch_first: bool = False,
    grad_enabled: bool = True,
    masks: list[Tensor] | None = None,
) -> DropoutReplay:
    """Forward of a fused multi-layer RNN in training mode, inter-layer dropout masks drawn again.

    On the CPU the fused kernel runs its layers one after the other and draws each mask with
    ``F.dropout`` from the global generator. Starting from the generator's state at the call, the same
    kernel per layer and the same draws between layers give the module's layers and masks again (the
    generator is restored afterwards). Whether they really are the module's is for the caller to check:
    the top layer must equal the module's output bit for bit.

    The kernel's matrix products round differently with the input's memory layout, with whether the
    weights require grad and (oneDNN's LSTM) with whether autograd is enabled: the caller passes the
    input as the module received it and weights whose ``requires_grad`` is that of the module's
    parameters, and gives the call's grad mode. A graph may be built here; it is dropped on return.

    Args:
        mode: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
        weights: ``weights[layer][direction]``, in the module's dtype.
        x: the input as the module received it, ``(B, T, I)`` with ``batch_first`` else ``(T, B, I)`` (an
            unbatched input with the batch axis the module adds); or the ``(N, I)`` data of a
            ``PackedSequence`` with its ``batch_sizes``, in the user's own packing order.
        h0: ``(L*D, B, P)`` initial hidden state, in ``x``'s batch order (the packing order when packed).
        c0: ``(L*D, B, H)`` initial cell state (LSTM).
        p: the module's ``dropout``.
        rng_state: ``torch.get_rng_state()`` taken just before the module was called.
        batch_sizes: the ``PackedSequence``'s ``batch_sizes``; ``None`` for a padded input.
        batch_first: the module's ``batch_first`` (padded input only).
        grad_enabled: whether autograd was enabled at the call.
        masks: the masks :func:`draw_dropout_masks` drew from ``rng_state`` already (on the thread that
            may touch the global generator); ``None`` draws them here.

    Returns:
        Every layer's output and the masks, time-major ``(T, B, D*P)``, or packed data ``(N, D*P)``;
        detached.
    """
    num_dirs = len(weights[0])
    outputs: list[Tensor] = []
    drawn = masks
    masks = []
    layer_in = x
    drawing = generator_state(rng_state) if drawn is None else contextlib.nullcontext()
    with torch.set_grad_enabled(grad_enabled), drawing:
        for layer, layer_weights in enumerate(weights):
            rows = slice(layer * num_dirs, (layer + 1) * num_dirs)
            # layer 0 reads the input as the module did; the kernel hands on time-major outputs
            first = layer == 0 and batch_first and batch_sizes is None
            out = _fused_layer(mode, layer_weights, layer_in, h0[rows], None if c0 is None else c0[rows],
                               batch_sizes, batch_first=first)
            out = out.transpose(0, 1) if first else out
            outputs.append(out.detach())
            if layer < len(weights) - 1:
                # F.dropout(out) is out * mask with the mask drawn for out's shape; dropping out ones draws
                # the same mask and gives it as it is.
                mask = F.dropout(torch.ones_like(out), p, training=True) if drawn is None else drawn[layer]
                masks.append(mask)
                layer_in = out * mask
    return DropoutReplay(outputs, masks)


def draw_dropout_masks(shapes: list[tuple[int, ...]], dtype: torch.dtype, p: float,
                       rng_state: Tensor) -> list[Tensor]:
    """The inter-layer dropout masks a fused CPU kernel drew from the generator's ``rng_state``, one per
    layer below the top, for layer outputs of ``shapes`` (``(T, B, D*P)``, or ``(N, D*P)`` packed).

    The kernel draws nothing but these masks, in layer order, so they can be drawn before the layers are
    computed: here, on the thread that may touch the global generator (whose state comes back after), for
    :func:`replay_with_dropout` to use on any thread.
    """
    with generator_state(rng_state):
        return [F.dropout(torch.ones(shape, dtype=dtype), p, training=True) for shape in shapes]


def _fused_layer(mode: str, weights: list[LayerWeights], x: Tensor, h0: Tensor, c0: Tensor | None,
                 batch_sizes: Tensor | None, batch_first: bool = False) -> Tensor:
    """One layer (all directions) through the module's own fused kernel; output in ``x``'s layout."""
    return _fused_call(mode, weights, x, h0, c0, batch_sizes, batch_first)[0]


def _fused_call(mode: str, weights: list[LayerWeights], x: Tensor, h0: Tensor, c0: Tensor | None,
                batch_sizes: Tensor | None, batch_first: bool = False,
                train: bool = False) -> tuple[Tensor, ...]:
    """The fused kernel on one layer: ``(output, h_n)``, and ``c_n`` for an LSTM.

    ``train``: cuDNN keeps what its backward needs only in training mode (no dropout here either way).
    """
    params: list[Tensor] = []
    for w in weights:
        params += [w.w_ih, w.w_hh] + ([w.b_ih, w.b_hh] if w.b_ih is not None else [])
        params += [w.w_hr] if w.w_hr is not None else []
    hx = (h0, c0) if mode == "LSTM" else h0
    op, bidirectional, has_bias = _FUSED_OPS[mode], len(weights) == 2, weights[0].b_ih is not None
    _quiet_kernel_warnings()
    if batch_sizes is None:
        return op(x, hx, params, has_bias, 1, 0.0, train, bidirectional, batch_first)
    return op(x, batch_sizes, hx, params, has_bias, 1, 0.0, train, bidirectional)


# cuDNN warns that our weights are not one flat buffer (it copies them into one), and oneDNN that it has no
# projected LSTM (the module's own call said so already): replay details, not something the user should see.
_KERNEL_WARNINGS = ("RNN module weights are not part of single contiguous", "LSTM with projections is not supported")
# A kernel's warning is attributed to the Python code that called it: our replay's calls, and the autograd
# call through which we run a backward (whose kernels' warnings are given there).
_OUR_CALLS = r"(lightning_rnnviz\.probe\.replay|torch\.autograd(\..*)?)\Z"
_QUIET = [("ignore", re.compile(m, re.I), Warning, re.compile(_OUR_CALLS), 0) for m in reversed(_KERNEL_WARNINGS)]


def _quiet_kernel_warnings() -> None:
    """Ignore the kernels' two warnings above where our own calls raise them.

    Not with ``warnings.catch_warnings()``, which swaps the process-wide filter list and is not
    thread-safe before Python 3.14 (the replay may run on a worker beside training): two filters, scoped
    by message and by the calling module, stay at the front of the list, where they match nothing of the
    user's. They are put back in front only when something was put before them (so a filter added since,
    such as a test's ``error``, does not turn our calls' warnings into errors), and left alone otherwise.
    """
    if warnings.filters[: len(_QUIET)] != _QUIET:
        for message in _KERNEL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module=_OUR_CALLS)


def _layer_forward(
    mode: str, weights: list[LayerWeights], x: Tensor, h0: Tensor, c0: Tensor | None, lengths: Tensor | None,
    cpu_lengths: Tensor | None,
) -> list[Tensor]:
    """Hidden states ``(T, B, P)`` of each direction of one layer, from the fused kernel; ``lengths`` on
    ``x``'s device and on the CPU."""
    if mode == "LSTM" and weights[0].w_hr is not None:
        return [_projected_lstm_forward(w, x, h0[d], c0[d], lengths, d) for d, w in enumerate(weights)]
    if lengths is None:
        out = _fused_layer(mode, weights, x, h0, c0, None)
    else:
        packed = pack_padded_sequence(x, cpu_lengths, enforce_sorted=False)
        order = packed.sorted_indices
        data = _fused_layer(mode, weights, packed.data, h0[:, order], None if c0 is None else c0[:, order],
                            packed.batch_sizes)
        out, _ = pad_packed_sequence(packed._replace(data=data), total_length=x.shape[0])
    return list(out.chunk(len(weights), dim=-1))


def _projected_lstm_forward(
    w: LayerWeights, x: Tensor, h: Tensor, c: Tensor, lengths: Tensor | None, direction: int
) -> Tensor:
    """One direction of a projected LSTM layer, step by step (oneDNN has no projected kernel)."""
    steps = x.shape[0]
    out = x.new_zeros(steps, h.shape[0], h.shape[1])
    for t in range(steps) if direction == 0 else range(steps - 1, -1, -1):
        # Written out: `torch.lstm_cell` assumes `h` and `c` share a size, which projection breaks.
        i, f, g, o = lstm_gates(x[t], h, w).values()
        c_new = f * c + i * g
        h_new = F.linear(o * torch.tanh(c_new), w.w_hr)
        if lengths is not None:
            keep = (t < lengths).unsqueeze(-1)
            h_new, c_new = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
        h, c = h_new, c_new
        out[t] = h
    return out


def _previous(h: Tensor, h0: Tensor, direction: int, valid: Tensor | None) -> Tensor:
    """``(T, B, P)``: the state each step started from, ``h0`` where a sequence starts."""
    first = h0.unsqueeze(0).to(h.dtype)
    if direction == 0:
        return torch.cat([first, h[:-1]])
    shifted = torch.cat([h[1:], first])
    if valid is None:
        return shifted
    next_valid = torch.cat([valid[1:], torch.zeros_like(valid[:1])])
    return torch.where(next_valid, shifted, first)


class _Row:
    """One layer and direction of a replay: its states, gates and (``factors``) what the step-by-step
    backward of :func:`_backward_row` needs; the fused backward needs only the states and gates."""

    def __init__(self, mode: str, w: LayerWeights, direction: int, x: Tensor, h: Tensor, h_prev: Tensor,
                 c0: Tensor | None, valid: Tensor | None, factors: bool = True) -> None:
        self.mode, self.w, self.direction, self.h = mode, w, direction, h
        self.c: Tensor | None = None
        self._tanh_c: Tensor | None = None
        self.gates = cell_gates(mode, x, h_prev, w)
        if mode == "LSTM":
            i, f, g, o = (self.gates[k] for k in LSTM_GATES)
            ig = i * g
            if valid is not None:
                # Past a sequence's end the cell stays as it was (1 * c + 0): the same recurrence as
                # without padding.
                f, ig = torch.where(valid, f, 1.0), torch.where(valid, ig, 0.0)
            # c_t = i_t g_t + f_t c_prev, from c0 at the first processed step
            first = 0 if direction == 0 else x.shape[0] - 1
            ig[first].addcmul_(f[first], c0)
            c_all = linear_recurrence(ig, f, later=direction == 1, out=ig)
            self.c = c_all
            if not factors:
                return
            f = self.gates["forget"]
            c_prev = _previous(c_all, c0, direction, valid)
            tanh_c = self.tanh_c
            # d(pre-activation) / dc for the input, forget and candidate gates, stacked (T, B, 3, H):
            # g i (1 - i), c_prev f (1 - f), i (1 - g^2), written into place (large temporaries are slow
            # on the CPU) in the order of operations of those expressions.
            self.dc_factor = i.new_empty(*i.shape[:-1], 3, i.shape[-1])
            d_input, d_forget, d_cell = self.dc_factor.unbind(-2)
            rest = torch.neg(i).add_(1)
            torch.mul(g, i, out=d_input).mul_(rest)
            torch.neg(f, out=rest).add_(1)
            torch.mul(c_prev, f, out=d_forget).mul_(rest)
            torch.mul(g, g, out=rest).neg_().add_(1)
            torch.mul(i, rest, out=d_cell)
            del c_prev
            torch.neg(o, out=rest).add_(1)
            self.do_factor = torch.mul(tanh_c, o).mul_(rest)  # tanh(c) o (1 - o)
            torch.mul(tanh_c, tanh_c, out=rest).neg_().add_(1)
            self.dh_to_dc = torch.mul(o, rest)  # o (1 - tanh^2 c)
            self.forget = f
        elif not factors:
            return
        elif mode == "GRU":
            r, z, n = (self.gates[k] for k in GRU_GATES)
            gh_n = F.linear(h_prev, w.w_hh.chunk(3)[2], None if w.b_hh is None else w.b_hh.chunk(3)[2])
            # (T, B, 3, H) each: [dr, dz, dn] and [dr, dz, dn * r] with dn = (1 - z)(1 - n^2),
            # dr = dn W_hn-part r (1 - r), dz = (h_prev - n) z (1 - z); written into place, in the order of
            # operations of those expressions.
            self.gi_factor = z.new_empty(*z.shape[:-1], 3, z.shape[-1])
            dr, dz, dn = self.gi_factor.unbind(-2)
            rest, scratch = torch.neg(z).add_(1), torch.mul(n, n)
            torch.mul(rest, scratch.neg_().add_(1), out=dn)
            torch.mul(dn, gh_n, out=dr).mul_(r).mul_(torch.neg(r, out=scratch).add_(1))
            del gh_n
            torch.sub(h_prev, n, out=dz).mul_(z).mul_(rest)
            del rest, scratch
            self.gh_factor = torch.empty_like(self.gi_factor)
            self.gh_factor[..., :2, :] = self.gi_factor[..., :2, :]
            torch.mul(dn, r, out=self.gh_factor[..., 2, :])
            self.keep = z
        elif mode == "RNN_TANH":
            self.pre_factor = 1 - h * h
        elif relu_passes_zero(h.device, h.dtype):
            # the kernel's ReLU passes the gradient where the pre-activation is exactly 0, which `h` (0
            # there either way) cannot tell from a negative one
            pre = F.linear(x, w.w_ih, w.b_ih) + F.linear(h_prev, w.w_hh, w.b_hh)
            self.pre_factor = (pre >= 0).to(h.dtype)
        else:
            self.pre_factor = (h > 0).to(h.dtype)

    @property
    def tanh_c(self) -> Tensor:
        """``tanh(c_t)`` of an LSTM row, computed once: the step check, the step-by-step backward's factors
        and the fused path's cell-gradient scan all read it (on the CPU a ``tanh`` takes about four times
        a ``sigmoid``)."""
        if self._tanh_c is None:
            self._tanh_c = torch.tanh(self.c)
        return self._tanh_c

    def take_tanh_c(self) -> Tensor:
        """:attr:`tanh_c` for its last reader, which may overwrite it (a large new buffer costs page faults
        on the CPU)."""
        tanh_c, self._tanh_c = self.tanh_c, None
        return tanh_c

    def drop_tanh_c(self) -> None:
        """Let go of :attr:`tanh_c` once nothing will read it."""
        self._tanh_c = None


_RELU_AT_ZERO: dict[tuple[torch.device, torch.dtype], bool] = {}


def relu_passes_zero(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused ReLU RNN kernel on ``device`` back-propagates through a pre-activation of exactly 0.

    Its derivative there is a convention: PyTorch's CPU kernel takes 0, cuDNN's backward 1 (found on an
    H100: with 0 the loop missed cuDNN's gradients by 1.5e-2 on a bias-free 3-layer RNN whose dropped-out
    inputs and zero initial state left pre-activations at exactly 0). The total ``dL/dh_t`` is what the
    training's backward computed, so the step-by-step backward takes the kernel's own convention, asked
    once per device and dtype with a one-unit kernel call (a zero input, a zero initial state).
    """
    key = (device, dtype)
    if key not in _RELU_AT_ZERO:
        with torch.inference_mode(False), torch.enable_grad():
            one = torch.ones(1, 1, dtype=dtype, device=device)
            x = torch.zeros(1, 1, 1, dtype=dtype, device=device, requires_grad=True)
            w = LayerWeights(one.clone().requires_grad_(), one.clone().requires_grad_())
            out = _fused_call("RNN_RELU", [w], x, torch.zeros(1, 1, 1, dtype=dtype, device=device), None,
                              None, train=True)[0]
            (dx,) = torch.autograd.grad(out.sum(), [x])
        _RELU_AT_ZERO[key] = bool(dx.item() != 0)
    return _RELU_AT_ZERO[key]


def _backward(rows: list[_Row], num_layers: int, num_dirs: int, x: Tensor, lengths: Tensor | None,
              valid: Tensor | None, grad_output: Tensor | None, grad_h_n: Tensor | None,
              grad_c_n: Tensor | None,
              dropout_masks: list[Tensor] | None = None,
              input_grad: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Back-propagation through time and layers; returns ``(dL/dh, dL/dc, dL/dx)``, the first two
    ``(L*D, T, B, .)``, the last ``(T, B, I)`` with ``input_grad``, else ``None``."""
    steps, batch = x.shape[:2]
    mask = valid.to(x.dtype) if valid is not None else None
    arange = torch.arange(batch, device=x.device)
    last = (lengths - 1) if lengths is not None else torch.full((batch,), steps - 1, device=x.device)
    hidden_grad: list[Tensor] = [None] * len(rows)  # type: ignore[list-item]
    cell_grad: list[Tensor] = [None] * len(rows)  # type: ignore[list-item]
    direct = grad_output  # (T, B, D*P): gradient reaching this layer's output from above
    for layer in range(num_layers - 1, -1, -1):
        d_input = None
        for direction in range(num_dirs):
            index = layer * num_dirs + direction
            row = rows[index]
            size = row.h.shape[-1]
            seed = (direct[..., direction * size : (direction + 1) * size].clone() if direct is not None
                    else torch.zeros_like(row.h))
            final = last if direction == 0 else torch.zeros_like(last)
            if grad_h_n is not None:
                seed[final, arange] += grad_h_n[index]
            seed_c = None
            if row.mode == "LSTM":
                seed_c = torch.zeros_like(row.c)
                if grad_c_n is not None:
                    seed_c[final, arange] += grad_c_n[index]
            dh_all, dc_all, d_pre = _backward_row(row, seed, seed_c, mask)
            hidden_grad[index], cell_grad[index] = dh_all, dc_all
            if layer == 0 and not input_grad:
                continue  # nothing below needs the gradient of the module's input
            contribution = F.linear(d_pre, row.w.w_ih.t())  # (T, B, I): gradient into the layer input
            d_input = contribution if d_input is None else d_input + contribution
        # The layer read the dropped-out states of the layer below: its gradient passes the same mask.
        direct = d_input * dropout_masks[layer - 1] if dropout_masks is not None and layer > 0 else d_input
    return _stacked(hidden_grad), (_stacked(cell_grad) if rows[0].mode == "LSTM" else None), direct


def _backward_row(row: _Row, seed: Tensor, seed_c: Tensor | None,
                  mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Backward through one layer and direction, in reverse processing order.

    Returns the total gradients w.r.t. ``h_t`` and ``c_t`` and the gradient w.r.t. each step's
    input-side pre-activations ``(T, B, G*H)`` (to be multiplied by ``W_ih``).
    """
    steps, batch = seed.shape[:2]
    order = range(steps - 1, -1, -1) if row.direction == 0 else range(steps)
    if row.mode == "LSTM":
        return _backward_lstm_row(row, seed, seed_c, mask, order)
    # Every per-step view is taken once, before the loop (an index is a call that holds the GIL, which on
    # the recording worker the training thread waits for).
    w_hh = row.w.w_hh
    dh_all = torch.empty_like(seed)
    seeds, dhs = seed.unbind(0), dh_all.unbind(0)
    masks = mask.unbind(0) if mask is not None else None
    dh_rec = torch.zeros_like(seed[0])
    if row.mode == "GRU":
        gates = row.gi_factor.shape[2:]  # (3, H)
        d_pre = seed.new_empty(steps, batch, gates.numel())
        d_steps = d_pre.unflatten(-1, gates).unbind(0)
        gi_factor, gh_factor, keep = row.gi_factor.unbind(0), row.gh_factor.unbind(0), row.keep.unbind(0)
        for t in order:
            dh = torch.add(seeds[t], dh_rec, out=dhs[t])
            if masks is not None:
                dh.mul_(masks[t])
            per_gate = dh.unsqueeze(1)
            torch.mul(per_gate, gi_factor[t], out=d_steps[t])
            d_hid = (per_gate * gh_factor[t]).flatten(1)
            dh_rec = torch.addmm(dh * keep[t], d_hid, w_hh)
        return dh_all, None, d_pre
    d_pre = seed.new_zeros(steps, batch, row.pre_factor.shape[-1])
    d_steps, pre_factor = d_pre.unbind(0), row.pre_factor.unbind(0)
    for t in order:
        dh = torch.add(seeds[t], dh_rec, out=dhs[t])
        if masks is not None:
            dh.mul_(masks[t])
        d_in = dh * pre_factor[t]
        dh_rec = d_in @ w_hh
        d_steps[t].copy_(d_in)
    return dh_all, None, d_pre


def _backward_lstm_row(row: _Row, seed: Tensor, seed_c: Tensor, mask: Tensor | None,
                       order: range) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_backward_row` for an LSTM. A step is five kernels writing into views of the outputs
    (`out=`), the views taken once: ``dL/dh_t`` is the seed plus the recurrent product in one ``addmm``;
    ``dL/dc_t`` one product and one ``addcmul``; the gate gradients two products."""
    steps, batch = seed.shape[:2]
    size = row.forget.shape[-1]
    w_hh, w_hr = row.w.w_hh, row.w.w_hr
    dh_all, dc_all = torch.empty_like(seed), torch.empty_like(seed_c)
    d_pre = seed.new_empty(steps, batch, 4 * size)
    seeded_c = set(torch.nonzero(seed_c.flatten(1).any(1)).flatten().tolist())  # usually only c_n's step
    seeds, dhs, dcs = seed.unbind(0), dh_all.unbind(0), dc_all.unbind(0)
    d_steps = d_pre.unbind(0)
    gate_parts = d_pre[..., : 3 * size].unflatten(-1, (3, size)).unbind(0)  # (B, 3, H): input, forget, cell
    output_parts = d_pre[..., 3 * size :].unbind(0)
    dh_to_dc, dc_factor = row.dh_to_dc.unbind(0), row.dc_factor.unbind(0)
    do_factor, forget = row.do_factor.unbind(0), row.forget.unbind(0)
    masks = mask.unbind(0) if mask is not None else None
    previous = None  # the step processed just before (t + 1 forward in time, t - 1 in reverse)
    for t in order:
        if previous is None:
            dh = dhs[t].copy_(seeds[t])
        else:
            dh = torch.addmm(seeds[t], d_steps[previous], w_hh, out=dhs[t])
        if masks is not None:
            dh.mul_(masks[t])
        dh_cell = dh @ w_hr if w_hr is not None else dh
        dc = torch.mul(dh_cell, dh_to_dc[t], out=dcs[t])
        if previous is not None:
            dc.addcmul_(dcs[previous], forget[previous])
        if t in seeded_c:
            dc.add_(seed_c[t])
        if masks is not None:
            dc.mul_(masks[t])
        torch.mul(dc.unsqueeze(1), dc_factor[t], out=gate_parts[t])
        torch.mul(dh_cell, do_factor[t], out=output_parts[t])
        previous = t
    return dh_all, dc_all, d_pre


def _backward_fused(rows: list[_Row], weights: list[list[LayerWeights]], layer_inputs: list[Tensor],
                    h0: Tensor, c0: Tensor | None, lengths: Tensor | None, valid: Tensor | None,
                    grad_output: Tensor | None, grad_h_n: Tensor | None, grad_c_n: Tensor | None,
                    dropout_masks: list[Tensor] | None, cpu_lengths: Tensor | None,
                    extended: list[_Extended | None] | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """What :func:`_backward` gives (``dL/dx`` always), from one backward of the fused kernel per layer.

    Layer by layer from the top, :func:`_layer_backward` gives, per direction, what each step's gate
    pre-activations pass back to the state the step read (``W_hh^T delta_t``; the GRU's in two parts), and
    the gradient reaching the layer's input, which (through the dropout mask the layer below's output was
    multiplied by) is ``g_t``, the gradient reaching ``h_t`` from above, of the layer below.
    With ``next`` the step processed after ``t`` (``t + 1`` forward, ``t - 1`` in reverse):

    - RNN, LSTM: ``dL/dh_t = g_t + W_hh^T delta_next``, read off the kernel's gradient;
    - LSTM: ``dL/dc_t = (dL/dh_t W_hr if projected) * o_t * (1 - tanh^2 c_t) + f_next * dL/dc_next``;
    - GRU: ``dL/dh_t = g_t + W_hh^T [delta_r, delta_z, r * delta_n]_next + z_next * dL/dh_next``;

    with the ``h_n``/``c_n`` gradients added at each sequence's last processed step. The recurrences are
    scans of ``ceil(log2 T)`` vectorised levels (:func:`linear_recurrence`). ``extended[layer]``: that
    layer's pass already run forward (when it also gave the layer's states), else ``None``.
    """
    x = layer_inputs[0]
    steps, batch = x.shape[:2]
    mask = valid.to(x.dtype) if valid is not None else None
    arange = torch.arange(batch, device=x.device)
    last = (lengths - 1) if lengths is not None else torch.full((batch,), steps - 1, device=x.device)
    num_layers, num_dirs = len(weights), len(weights[0])
    hidden_grad: list[Tensor] = [None] * len(rows)  # type: ignore[list-item]
    cell_grad: list[Tensor] = [None] * len(rows)  # type: ignore[list-item]
    direct = grad_output  # (T, B, D*P): gradient reaching this layer's output from above
    for layer in range(num_layers - 1, -1, -1):
        first = layer * num_dirs
        here = slice(first, first + num_dirs)
        d_input, back = _layer_backward(
            rows[first].mode, weights[layer], layer_inputs[layer], h0[here], None if c0 is None else c0[here],
            cpu_lengths, direct, None if grad_h_n is None else grad_h_n[here],
            None if grad_c_n is None else grad_c_n[here], None if extended is None else extended[layer],
        )
        if extended is not None:
            extended[layer] = None  # its graph is let go as soon as its backward ran
        for direction in range(num_dirs):
            index = first + direction
            row = rows[index]
            size = row.h.shape[-1]
            seed = (direct[..., direction * size : (direction + 1) * size].clone() if direct is not None
                    else torch.zeros_like(row.h))
            final = last if direction == 0 else torch.zeros_like(last)
            if grad_h_n is not None:
                seed[final, arange] += grad_h_n[index]
            seed_c = None
            if grad_c_n is not None:
                seed_c = torch.zeros_like(row.c)
                seed_c[final, arange] += grad_c_n[index]
            hidden_grad[index], cell_grad[index] = _grads_from_back(row, seed, seed_c, back[direction],
                                                                    mask)
        # The layer read the dropped-out states of the layer below: its gradient passes the same mask.
        # (A copy either way: the views would keep this layer's whole gradient alive during the next.)
        if layer > 0:
            direct = d_input * dropout_masks[layer - 1] if dropout_masks is not None else d_input.contiguous()
        else:
            direct = d_input
        del d_input, back
    return _stacked(hidden_grad), (_stacked(cell_grad) if rows[0].mode == "LSTM" else None), direct


def _layer_backward(mode: str, weights: list[LayerWeights], x: Tensor, h0: Tensor, c0: Tensor | None,
                    cpu_lengths: Tensor | None, grad_out: Tensor | None, grad_h: Tensor | None,
                    grad_c: Tensor | None, extended: _Extended | None = None) -> tuple[Tensor, list[Tensor]]:
    """One layer's input gradient ``(T, B, I)`` and, per direction, what each step's gate pre-activations
    pass back to the state that step read, from the fused kernel's backward (:class:`_Extended`; its
    forward run here unless given as ``extended``).

    Args:
        grad_out: ``(T, B, D*P)`` gradient reaching the layer's output from above (zero at padded steps),
            or ``None``.
        grad_h: ``(D, B, P)`` gradient of the layer's ``h_n``, or ``None``; ``grad_c``: of its ``c_n``.
    """
    if extended is None:
        extended = _Extended(mode, weights, x, h0, c0, cpu_lengths)
    return extended.backward(grad_out, grad_h, grad_c)


class _Extended:
    """One layer (all directions) run forward through the fused kernel on an autograd graph of our own,
    with an extra input whose gradient is what each step passes back to the state it read.

    The layer gets an extra input ``z_t = 0`` per direction whose input weights are the recurrent ones,
    ``W_hh`` (zeros for the other direction's): the kernel computes the same states, and the gradient with
    respect to ``z_t`` is ``W_hh^T delta_t``, ``delta_t`` the gate pre-activation gradients at step ``t``:
    the part of ``dL/dh`` that the recurrence carries back, ``(T, B, P)``. The GRU's candidate gate reads
    the state as ``r * (W_hn h + b_hn)`` on the recurrent side, while the input side's gradient is that of
    the gate's whole argument, ``delta_n``; its extra input therefore has ``W_hr``, ``W_hz`` for the first
    ``H`` features and an identity onto the candidate gate for the next ``H``, giving
    ``[W_hr^T delta_r + W_hz^T delta_z, delta_n]``, ``(T, B, 2H)``. The extra input is as wide as the state
    (twice for the GRU), not as all gates together (which the kernel's input matmuls would carry forward
    and back: with an LSTM's ``4H``, 2-4 times the layer's own work).

    The forward is the layer's forward too: :attr:`states` are the layer's states per direction, ``(T, B,
    P)`` each (zero at padded steps), so a layer whose states are not known needs no other forward.
    """

    def __init__(self, mode: str, weights: list[LayerWeights], x: Tensor, h0: Tensor, c0: Tensor | None,
                 cpu_lengths: Tensor | None) -> None:
        num_dirs = len(weights)
        steps, batch, self.features = x.shape
        self.cpu_lengths, self.num_dirs = cpu_lengths, num_dirs
        # A graph of our own, also when the caller runs without autograd or in inference mode; it is freed
        # by the backward below (or with this object).
        with torch.inference_mode(False), torch.enable_grad():
            blocks = [_recurrent_block(mode, _own(w.w_hh)) for w in weights]
            width = blocks[0].shape[1]
            ext = []
            for direction, (w, block) in enumerate(zip(weights, blocks)):
                through = w.w_ih.new_zeros(block.shape[0], num_dirs * width)
                through[:, direction * width : (direction + 1) * width] = block
                ext.append(LayerWeights(torch.cat([_own(w.w_ih), through], dim=1), _own(w.w_hh), _own(w.b_ih),
                                        _own(w.b_hh), _own(w.w_hr)))
            self.x_ext = torch.cat([_own(x), x.new_zeros(steps, batch, num_dirs * width)],
                                   dim=-1).requires_grad_()
            h, c = _own(h0), _own(c0)
            if cpu_lengths is None:
                self.result = _fused_call(mode, ext, self.x_ext, h, c, None, train=True)
                out = self.result[0].detach()
            else:
                packed = pack_padded_sequence(self.x_ext, cpu_lengths, enforce_sorted=False)
                self.order = packed.sorted_indices
                # the kernel's h_n and c_n come in the packing order
                self.result = _fused_call(mode, ext, packed.data, h[:, self.order],
                                          None if c is None else c[:, self.order], packed.batch_sizes,
                                          train=True)
                out, _ = pad_packed_sequence(packed._replace(data=self.result[0].detach()), total_length=steps)
        self.states = list(out.chunk(num_dirs, dim=-1))

    def backward(self, grad_out: Tensor | None, grad_h: Tensor | None,
                 grad_c: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """See :func:`_layer_backward`; the graph is freed afterwards."""
        with torch.inference_mode(False), torch.enable_grad():
            if self.cpu_lengths is None:
                g_out = _own(grad_out)
            else:
                g_out = (None if grad_out is None
                         else pack_padded_sequence(_own(grad_out), self.cpu_lengths, enforce_sorted=False).data)
                grad_h = None if grad_h is None else grad_h[:, self.order]
                grad_c = None if grad_c is None else grad_c[:, self.order]
            outputs, grads = [], []
            for value, grad in zip(self.result, (g_out, grad_h, grad_c)):
                if grad is not None:
                    outputs.append(value)
                    grads.append(_own(grad))
            _quiet_kernel_warnings()
            (d_ext,) = torch.autograd.grad(outputs, [self.x_ext], grads)
        del self.result, self.x_ext
        features = self.features
        return d_ext[..., :features], list(d_ext[..., features:].chunk(self.num_dirs, dim=-1))


def _recurrent_block(mode: str, w_hh: Tensor) -> Tensor:
    """The input weights of :func:`_layer_backward`'s extra input for one direction: ``W_hh`` ``(G*H, P)``; for
    the GRU ``[[W_hr, 0], [W_hz, 0], [0, I]]`` ``(3H, 2H)``."""
    if mode != "GRU":
        return w_hh
    size = w_hh.shape[1]
    block = w_hh.new_zeros(3 * size, 2 * size)
    block[: 2 * size, :size] = w_hh[: 2 * size]
    block[2 * size :, size:] = torch.eye(size, dtype=w_hh.dtype, device=w_hh.device)
    return block


def _own(t: Tensor | None) -> Tensor | None:
    """``t`` for our graph: detached from any graph of the caller's, copied if an inference tensor (which
    autograd cannot save)."""
    if t is None:
        return None
    return t.clone() if t.is_inference() else t.detach()


def _following(t: Tensor, direction: int) -> Tensor:
    """``(T, ...)``: at each step, ``t`` at the step processed next; zero after the last."""
    pad = torch.zeros_like(t[:1])
    return torch.cat([t[1:], pad]) if direction == 0 else torch.cat([pad, t[:-1]])


# On the CPU the doubling does about log2(T) times the arithmetic of the step loop for a tenth or less of its
# operations; it wins there while a step's slice times log2(T) stays below this many elements (measured on
# one core: equal at about 8,000, the loop 3-10x faster beyond 20,000).
DOUBLING_CPU_WORK = 8192


def linear_recurrence(direct: Tensor, carry: Tensor, later: bool, out: Tensor | None = None) -> Tensor:
    """``out_t = direct_t + carry_t * out_next`` for every ``t`` of the first axis, where ``next`` is
    ``t + 1`` (``later``) or ``t - 1``, and ``out`` is zero beyond the ends; ``carry`` is in ``[0, 1]``
    here (gates, masks), so no product of it grows. ``out``: where the result goes, ``direct`` itself to
    overwrite it (a new buffer as large costs its page faults on the CPU); a new tensor by default.

    A first-order linear recurrence is a scan: by recursive doubling, level ``k`` folds in the result
    ``2^k`` steps away (``out_t += carry_t * out_{t±2^k}``, ``carry_t *= carry_{t±2^k}``), so
    ``ceil(log2 T)`` levels of a few vectorised operations replace ``T`` small ones. That is what a GPU
    wants, where each operation is a kernel launch, and what the CPU wants for small steps; for large
    steps on the CPU (see :data:`DOUBLING_CPU_WORK`) the step loop, one ``addcmul`` a step, is faster.
    The two sum in another order: they agree to rounding, not bit for bit.
    """
    steps = direct.shape[0]
    levels = max(steps - 1, 0).bit_length()
    if direct.device.type == "cpu" and direct.numel() // max(steps, 1) * levels > DOUBLING_CPU_WORK:
        out = torch.empty_like(direct) if out is None else out
        acc = torch.zeros_like(direct[0])
        directs, carries, outs = direct.unbind(0), carry.unbind(0), out.unbind(0)  # the views taken once
        for t in range(steps - 1, -1, -1) if later else range(steps):
            acc = torch.addcmul(directs[t], carries[t], acc, out=outs[t])
        return out
    if out is None:
        out = direct.clone()
    elif out is not direct:
        out.copy_(direct)
    factor = carry.clone()
    span = 1
    for level in range(levels):
        # `here` are the steps that fold in the one `span` away (`there`), both views of `out`
        here, there = (slice(0, steps - span), slice(span, steps)) if later else (slice(span, steps),
                                                                                   slice(0, steps - span))
        folded = torch.addcmul(out[here], factor[here], out[there])
        if level < levels - 1:
            factor[here] = factor[here] * factor[there]
        out[here] = folded
        span *= 2
    return out


def _scan(direct: Tensor, carry: Tensor, direction: int) -> Tensor:
    """``out_t = direct_t + carry_t * out_next``, ``next`` the step processed after ``t`` (``t + 1`` for the
    forward direction, ``t - 1`` for the reverse): a gradient carried back in processing order, written
    over ``direct``."""
    return linear_recurrence(direct, carry, later=direction == 0, out=direct)


def _grads_from_back(row: _Row, seed: Tensor, seed_c: Tensor | None, back: Tensor,
                       mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Total ``dL/dh_t`` (and ``dL/dc_t``) of one layer and direction from what its steps pass back.

    Args:
        seed: ``(T, B, P)`` the gradient reaching ``h_t`` from above, ``h_n``'s at the last step.
        seed_c: ``(T, B, H)`` ``c_n``'s gradient at the last step, or ``None``.
        back: ``(T, B, P)`` ``W_hh^T delta_t`` (zero at padded steps); the GRU's ``(T, B, 2H)``
            ``[W_hr^T delta_r + W_hz^T delta_z, delta_n]`` (see :func:`_layer_backward`).
        mask: ``(T, B, 1)`` 1 at valid steps, 0 past a sequence's end; ``None`` without padding.
    """
    if row.mode == "GRU":
        gates_part, d_n = back.chunk(2, dim=-1)
        w_hn = row.w.w_hh.chunk(3)[2]
        recurrent = torch.matmul(row.gates["reset"] * d_n, w_hn).add_(gates_part)
        direct = _following(recurrent, row.direction).add_(seed)
        carry = _following(row.gates["update"], row.direction)
        if mask is not None:
            # zero where the step is padded, so nothing is carried across a sequence's end
            direct.mul_(mask)
            carry = carry * mask
        return _scan(direct, carry, row.direction), None
    dh = _following(back, row.direction).add_(seed)
    if mask is not None:
        dh.mul_(mask)
    if row.mode != "LSTM":
        return dh, None
    dh_cell = dh @ row.w.w_hr if row.w.w_hr is not None else dh
    rest = row.take_tanh_c()
    rest = rest.mul_(rest).neg_().add_(1)
    direct = torch.mul(dh_cell, row.gates["output"]).mul_(rest)  # dh o (1 - tanh^2 c)
    del rest
    if seed_c is not None:
        direct.add_(seed_c)
    carry = _following(row.gates["forget"], row.direction)
    if mask is not None:
        direct.mul_(mask)
        carry = carry * mask
    return dh, _scan(direct, carry, row.direction)
