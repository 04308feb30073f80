"""Independent, deliberately naive references for what the probe must record.

Nothing here calls the module under test or any fused kernel: the recurrent reference reads the
module's parameters and re-runs every step of every sequence separately with the gate formulas
written out elementwise; the attention reference re-projects queries/keys and builds each head's
softmax by hand. Every ``h_t`` / ``c_t`` of the recurrent reference is kept with ``retain_grad()``,
so after ``loss.backward()`` on the reference outputs its ``.grad`` is the total ``dL/dh_t``
through time and layers.

By default the reference computes in float64 on *copies* of the parameters, so it never touches
the module's ``.grad`` and its own rounding error is negligible next to the float32 records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

LSTM_GATES = ("input", "forget", "cell", "output")
GRU_GATES = ("reset", "update", "new")


# --------------------------------------------------------------------------------------------------
# elementwise nonlinearities, written out
# --------------------------------------------------------------------------------------------------


def sigmoid(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def tanh(x: Tensor) -> Tensor:
    # tanh(x) = 2 * sigmoid(2x) - 1 ; stable for both signs in float64 at the magnitudes used here
    return 2.0 / (1.0 + torch.exp(-2.0 * x)) - 1.0


def relu(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def softmax_last(x: Tensor) -> Tensor:
    top = x.max(dim=-1, keepdim=True).values
    e = torch.exp(x - top)
    return e / e.sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# recurrent reference
# --------------------------------------------------------------------------------------------------


def module_kind(module: nn.Module) -> str:
    """The ``RNNRecord.kind`` string the probe should report for ``module``."""
    if isinstance(module, nn.LSTM):
        return "LSTM"
    if isinstance(module, nn.GRU):
        return "GRU"
    if isinstance(module, nn.RNN):
        return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
    if isinstance(module, nn.LSTMCell):
        return "LSTMCell"
    if isinstance(module, nn.GRUCell):
        return "GRUCell"
    if isinstance(module, nn.RNNCell):
        return "RNNCell"
    raise TypeError(f"not a recurrent module: {type(module).__name__}")


def _base(kind: str) -> str:
    if kind.startswith("LSTM"):
        return "LSTM"
    if kind.startswith("GRU"):
        return "GRU"
    if kind in ("RNN_TANH", "RNN_RELU"):
        return kind
    raise ValueError(kind)


@dataclass
class _StepParams:
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_hr: Tensor | None = None


def _take(p: Tensor | None, dtype: torch.dtype, through_module: bool) -> Tensor | None:
    if p is None:
        return None
    if through_module:
        return p.to(dtype)  # differentiable copy: gradients reach the module's parameters
    return p.detach().to(dtype).clone().requires_grad_(True)


def _layer_params(module: nn.Module, layer: int, direction: int, dtype, through_module) -> _StepParams:
    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    has_bias = bool(module.bias)
    proj = getattr(module, "proj_size", 0)
    return _StepParams(
        w_ih=_take(getattr(module, "weight_ih" + sfx), dtype, through_module),
        w_hh=_take(getattr(module, "weight_hh" + sfx), dtype, through_module),
        b_ih=_take(getattr(module, "bias_ih" + sfx), dtype, through_module) if has_bias else None,
        b_hh=_take(getattr(module, "bias_hh" + sfx), dtype, through_module) if has_bias else None,
        w_hr=_take(getattr(module, "weight_hr" + sfx), dtype, through_module) if proj > 0 else None,
    )


def _cell_params(cell: nn.Module, dtype, through_module) -> _StepParams:
    return _StepParams(
        w_ih=_take(cell.weight_ih, dtype, through_module),
        w_hh=_take(cell.weight_hh, dtype, through_module),
        b_ih=_take(cell.bias_ih, dtype, through_module) if cell.bias else None,
        b_hh=_take(cell.bias_hh, dtype, through_module) if cell.bias else None,
    )


def _affine(w: Tensor, b: Tensor | None, v: Tensor) -> Tensor:
    out = torch.mv(w, v)
    return out if b is None else out + b


def _step(base: str, p: _StepParams, x: Tensor, h: Tensor, c: Tensor | None):
    """One time step for ONE sequence (all vectors 1-D). Returns ``(h_new, c_new, gates)``."""
    gi = _affine(p.w_ih, p.b_ih, x)
    gh = _affine(p.w_hh, p.b_hh, h)
    if base == "LSTM":
        n = p.w_hh.shape[0] // 4
        pre = gi + gh
        i = sigmoid(pre[0:n])
        f = sigmoid(pre[n : 2 * n])
        g = tanh(pre[2 * n : 3 * n])
        o = sigmoid(pre[3 * n : 4 * n])
        c_new = f * c + i * g
        h_new = o * tanh(c_new)
        if p.w_hr is not None:
            h_new = torch.mv(p.w_hr, h_new)
        return h_new, c_new, {"input": i, "forget": f, "cell": g, "output": o}
    if base == "GRU":
        n = p.w_hh.shape[0] // 3
        r = sigmoid(gi[0:n] + gh[0:n])
        z = sigmoid(gi[n : 2 * n] + gh[n : 2 * n])
        cand = tanh(gi[2 * n : 3 * n] + r * gh[2 * n : 3 * n])
        h_new = (1.0 - z) * cand + z * h
        return h_new, None, {"reset": r, "update": z, "new": cand}
    pre = gi + gh
    h_new = tanh(pre) if base == "RNN_TANH" else relu(pre)
    return h_new, None, {}


@dataclass
class RNNReference:
    """Result of :func:`reference_rnn` / :func:`reference_cell_loop`.

    ``output`` / ``h_n`` / ``c_n`` have the *module's* conventions (``output`` batch-first padded
    ``(B, T, D*H_out)`` with zeros past each length, ``h_n`` ``(L*D, B, H_out)``) so the same loss can
    be applied to module and reference. After ``backward()`` the ``*_grad`` methods give the total
    gradients, zero where a state received none (or lies past the sequence's end).
    """

    kind: str
    num_layers: int
    num_directions: int
    batch: int
    time: int
    hidden_out: int
    hidden_size: int
    lengths: Tensor
    output: Tensor
    h_n: Tensor
    c_n: Tensor | None
    gate_names: tuple[str, ...]
    cell_output: Tensor | None = None  # cell loops only: stacked c_t (B, S, H), differentiable
    _h: dict = field(default_factory=dict, repr=False)
    _c: dict = field(default_factory=dict, repr=False)
    _g: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return self.num_layers * self.num_directions

    def _assemble(self, store: dict, width: int, grad: bool) -> Tensor:
        out = torch.zeros(self.rows, self.batch, self.time, width, dtype=torch.float64)
        for (row, b, t), v in store.items():
            src = v.grad if grad else v
            if src is not None:
                out[row, b, t] = src.detach().to(torch.float64)
        return out

    def hidden(self) -> Tensor:
        return self._assemble(self._h, self.hidden_out, grad=False)

    def hidden_grad(self) -> Tensor:
        return self._assemble(self._h, self.hidden_out, grad=True)

    def cell(self) -> Tensor | None:
        return self._assemble(self._c, self.hidden_size, grad=False) if self._c else None

    def cell_grad(self) -> Tensor | None:
        return self._assemble(self._c, self.hidden_size, grad=True) if self._c else None

    def gates(self) -> dict[str, Tensor]:
        result = {}
        for name in self.gate_names:
            store = {key: g[name] for key, g in self._g.items()}
            result[name] = self._assemble(store, self.hidden_size, grad=False)
        return result

    def valid_mask(self) -> Tensor:
        return torch.arange(self.time).unsqueeze(0) < self.lengths.unsqueeze(1)

    def grad_norm(self, alignment: str = "start") -> Tensor:
        """``(rows, time)``: mean over sequences of ``||dL/dh_t||``, computed by loops; with ``alignment``
        ``"start"`` column ``t`` is step ``t`` of the sequences valid there, with ``"end"`` column
        ``T_max - 1 - d`` is ``d`` steps before each sequence's end (``T_max`` the longest length)."""
        g = self.hidden_grad()
        longest = int(self.lengths.max())
        out = torch.full((self.rows, self.time), float("nan"), dtype=torch.float64)
        for row in range(self.rows):
            for t in range(self.time):
                norms = []
                for b in range(self.batch):
                    n = int(self.lengths[b])
                    step = t if alignment == "start" else n - 1 - (longest - 1 - t)
                    if 0 <= step < n:
                        norms.append(math.sqrt(float((g[row, b, step] ** 2).sum())))
                if norms:
                    out[row, t] = sum(norms) / len(norms)
        return out


def reference_rnn(
    module: nn.RNNBase,
    x: Tensor,
    lengths: Tensor | list[int] | None = None,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    through_module: bool = False,
    dropout_masks: list[Tensor] | None = None,
) -> RNNReference:
    """Re-run ``module`` (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``) step by step, one sequence at a time.

    Args:
        x: padded input, ALWAYS batch-first ``(B, T, input_size)`` whatever ``module.batch_first``.
        lengths: valid length of each sequence (default: all ``T``).
        h0, c0: initial states in the module's layout ``(L*D, B, H_out)`` / ``(L*D, B, H)``.
        dtype: compute dtype (parameters and inputs are cast).
        through_module: when ``True`` gradients flow into the module's own parameters (and into
            ``x`` / ``h0`` / ``c0`` if they require grad); otherwise parameters are fresh leaf copies.
        dropout_masks: inter-layer dropout as the module applied it in training: ``num_layers - 1``
            tensors ``(B, T, D*H_out)`` (batch-first, padded), the factor (0 or ``1/(1-p)``) each element
            of layer ``l``'s output is multiplied by before layer ``l + 1`` reads it. ``None``: no dropout.
    """
    kind = module_kind(module)
    base = _base(kind)
    B, T, _ = x.shape
    L = module.num_layers
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    proj = getattr(module, "proj_size", 0)
    H_out = proj if proj > 0 else H
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if not through_module:
        x = x.detach()
        h0 = None if h0 is None else h0.detach()
        c0 = None if c0 is None else c0.detach()
    xd = x.to(dtype)
    h0d = None if h0 is None else h0.to(dtype)
    c0d = None if c0 is None else c0.to(dtype)

    params = [[_layer_params(module, l, d, dtype, through_module) for d in range(D)] for l in range(L)]
    gate_names = {"LSTM": LSTM_GATES, "GRU": GRU_GATES}.get(base, ())

    hs: dict = {}
    cs: dict = {}
    gs: dict = {}
    outputs = []
    h_final = [[None] * B for _ in range(L * D)]
    c_final = [[None] * B for _ in range(L * D)]
    with torch.enable_grad():
        for b in range(B):
            n = int(lengths[b])
            layer_in = [xd[b, t] for t in range(n)]
            for l in range(L):
                per_dir = []
                for d in range(D):
                    row = l * D + d
                    p = params[l][d]
                    h = h0d[row, b] if h0d is not None else torch.zeros(H_out, dtype=dtype)
                    c = None
                    if base == "LSTM":
                        c = c0d[row, b] if c0d is not None else torch.zeros(H, dtype=dtype)
                    outs: list = [None] * n
                    order = range(n) if d == 0 else range(n - 1, -1, -1)
                    for t in order:
                        h, c, gates = _step(base, p, layer_in[t], h, c)
                        h.retain_grad()
                        hs[(row, b, t)] = h
                        if c is not None:
                            c.retain_grad()
                            cs[(row, b, t)] = c
                        gs[(row, b, t)] = gates
                        outs[t] = h
                    h_final[row][b] = h
                    c_final[row][b] = c
                    per_dir.append(outs)
                layer_in = [torch.cat([per_dir[d][t] for d in range(D)]) for t in range(n)]
                if dropout_masks is not None and l < L - 1:
                    # h_n keeps the states themselves; only the next layer reads them dropped out
                    layer_in = [v * dropout_masks[l][b, t].to(dtype) for t, v in enumerate(layer_in)]
            seq = torch.stack(layer_in) if n > 0 else torch.zeros(0, D * H_out, dtype=dtype)
            if n < T:
                seq = torch.cat([seq, torch.zeros(T - n, D * H_out, dtype=dtype)])
            outputs.append(seq)
        output = torch.stack(outputs)
        h_n = torch.stack([torch.stack(h_final[row]) for row in range(L * D)])
        c_n = torch.stack([torch.stack(c_final[row]) for row in range(L * D)]) if base == "LSTM" else None
    return RNNReference(
        kind=kind,
        num_layers=L,
        num_directions=D,
        batch=B,
        time=T,
        hidden_out=H_out,
        hidden_size=H,
        lengths=lengths,
        output=output,
        h_n=h_n,
        c_n=c_n,
        gate_names=gate_names,
        _h=hs,
        _c=cs,
        _g=gs,
    )


def reference_cell_loop(
    cell: nn.RNNCellBase,
    xs: Tensor,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    through_module: bool = False,
) -> RNNReference:
    """Reference for a cell called once per step in a Python loop over ``xs`` ``(B, S, input)``.

    ``h0`` / ``c0`` are ``(B, H)`` (``None`` = zeros, as the cell does). ``output`` is the stacked
    hidden states ``(B, S, H)``; ``h_n`` / ``c_n`` are the last ones with a leading axis of 1.
    """
    kind = module_kind(cell)
    base = {"LSTMCell": "LSTM", "GRUCell": "GRU"}.get(kind)
    if base is None:
        base = "RNN_TANH" if cell.nonlinearity == "tanh" else "RNN_RELU"
    B, S, _ = xs.shape
    H = cell.hidden_size
    if not through_module:
        xs = xs.detach()
        h0 = None if h0 is None else h0.detach()
        c0 = None if c0 is None else c0.detach()
    p = _cell_params(cell, dtype, through_module)
    xd = xs.to(dtype)
    hs: dict = {}
    cs: dict = {}
    gs: dict = {}
    outs, couts = [], []
    h_last, c_last = [], []
    with torch.enable_grad():
        for b in range(B):
            h = h0[b].to(dtype) if h0 is not None else torch.zeros(H, dtype=dtype)
            c = None
            if base == "LSTM":
                c = c0[b].to(dtype) if c0 is not None else torch.zeros(H, dtype=dtype)
            seq, cseq = [], []
            for t in range(S):
                h, c, gates = _step(base, p, xd[b, t], h, c)
                h.retain_grad()
                hs[(0, b, t)] = h
                if c is not None:
                    c.retain_grad()
                    cs[(0, b, t)] = c
                    cseq.append(c)
                gs[(0, b, t)] = gates
                seq.append(h)
            outs.append(torch.stack(seq))
            if cseq:
                couts.append(torch.stack(cseq))
            h_last.append(h)
            c_last.append(c)
        output = torch.stack(outs)
        h_n = torch.stack(h_last).unsqueeze(0)
        c_n = torch.stack(c_last).unsqueeze(0) if base == "LSTM" else None
        cell_output = torch.stack(couts) if couts else None
    return RNNReference(
        kind=kind,
        num_layers=1,
        num_directions=1,
        batch=B,
        time=S,
        hidden_out=H,
        hidden_size=H,
        lengths=torch.full((B,), S, dtype=torch.long),
        output=output,
        h_n=h_n,
        c_n=c_n,
        gate_names={"LSTM": LSTM_GATES, "GRU": GRU_GATES}.get(base, ()),
        cell_output=cell_output,
        _h=hs,
        _c=cs,
        _g=gs,
    )


# --------------------------------------------------------------------------------------------------
# attention reference
# --------------------------------------------------------------------------------------------------


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Bool mask (True = not allowed) -> 0 / -inf; float mask -> added as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=dtype)
        return zeros.masked_fill(mask, float("-inf"))
    return mask.detach().to(dtype)


def causal_mask(n: int, m: int | None = None) -> Tensor:
    """Boolean ``(n, m)`` mask, True above the diagonal (future keys hidden)."""
    m = n if m is None else m
    rows = torch.arange(n).unsqueeze(1)
    cols = torch.arange(m).unsqueeze(0)
    return cols > rows


def reference_mha(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Per-head softmax weights ``(B, heads, T_q, T_k_total)`` of ``nn.MultiheadAttention``, pre-dropout.

    Takes the arguments exactly as passed to ``mha(...)`` (module layout: ``batch_first`` or not,
    batched or unbatched). Columns added by ``add_bias_kv`` then ``add_zero_attn`` come last.
    ``value`` is unused (weights do not depend on it) and accepted for call-signature symmetry.
    """
    del value
    E = mha.embed_dim
    nh = mha.num_heads
    hd = E // nh
    unbatched = query.dim() == 2
    q_in = query.detach().to(dtype)
    k_in = key.detach().to(dtype)
    if unbatched:
        q_in = q_in.unsqueeze(0)
        k_in = k_in.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0).reshape(-1, *attn_mask.shape[-2:])
    elif not mha.batch_first:
        q_in = q_in.transpose(0, 1)
        k_in = k_in.transpose(0, 1)
    B, Tq, _ = q_in.shape
    Tk = k_in.shape[1]

    if mha.in_proj_weight is not None:
        w = mha.in_proj_weight.detach().to(dtype)
        wq, wk = w[0:E], w[E : 2 * E]
    else:
        wq = mha.q_proj_weight.detach().to(dtype)
        wk = mha.k_proj_weight.detach().to(dtype)
    if mha.in_proj_bias is not None:
        bias = mha.in_proj_bias.detach().to(dtype)
        bq, bk = bias[0:E], bias[E : 2 * E]
    else:
        bq = bk = torch.zeros(E, dtype=dtype)

    # additive mask (B, nh, Tq, Tk) over the real keys
    add = torch.zeros(B, nh, Tq, Tk, dtype=dtype)
    if is_causal and attn_mask is None:
        attn_mask = causal_mask(Tq, Tk)
    am = _additive(attn_mask, dtype)
    if am is not None:
        if am.dim() == 2:
            add = add + am.view(1, 1, Tq, Tk)
        else:
            add = add + am.view(B, nh, Tq, Tk)
    kpm = _additive(key_padding_mask, dtype)
    if kpm is not None:
        add = add + kpm.view(B, 1, 1, Tk)

    weights = torch.zeros(B, nh, Tq, Tk + (mha.bias_k is not None) + bool(mha.add_zero_attn), dtype=dtype)
    for b in range(B):
        q = q_in[b] @ wq.T + bq  # (Tq, E)
        k = k_in[b] @ wk.T + bk  # (Tk, E)
        if mha.bias_k is not None:
            k = torch.cat([k, mha.bias_k.detach().to(dtype).reshape(1, E)])
        for h in range(nh):
            qh = q[:, h * hd : (h + 1) * hd]
            kh = k[:, h * hd : (h + 1) * hd]
            scores = (qh @ kh.T) / math.sqrt(hd)  # (Tq, Tk [+1])
            mask_bh = add[b, h]
            if mha.bias_k is not None:
                mask_bh = torch.cat([mask_bh, torch.zeros(Tq, 1, dtype=dtype)], dim=1)
            if mha.add_zero_attn:
                # a zero key vector: score exactly 0, mask column 0
                scores = torch.cat([scores, torch.zeros(Tq, 1, dtype=dtype)], dim=1)
                mask_bh = torch.cat([mask_bh, torch.zeros(Tq, 1, dtype=dtype)], dim=1)
            weights[b, h] = softmax_last(scores + mask_bh)
    return weights


def reference_additive_attention(query: Tensor, keys: Tensor, w_q: Tensor, w_k: Tensor, v: Tensor,
                                 mask: Tensor | None = None) -> Tensor:
    """Bahdanau scores ``softmax_t(v . tanh(W_q q + W_k k_t))`` for one step: ``(B, T)`` float64."""
    q = query.detach().double()
    k = keys.detach().double()
    wq, wk, vv = (t.detach().double() for t in (w_q, w_k, v))
    B, T, _ = k.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        s = torch.stack([
            torch.dot(vv, tanh(wq @ q[b] + wk @ k[b, t]))
            for t in range(T)
        ])
        if mask is not None:
            s = s.masked_fill(mask[b], float("-inf"))
        out[b] = softmax_last(s)
    return out


# --------------------------------------------------------------------------------------------------
# inter-layer dropout of the fused CPU kernel
# --------------------------------------------------------------------------------------------------


def cpu_dropout_masks(rng_state: Tensor, num_layers: int, shape: tuple[int, ...], p: float) -> list[Tensor]:
    """The inter-layer dropout masks a fused CPU ``nn.RNN/LSTM/GRU`` draws in training, written out.

    Between layers the kernel drops out each layer's output: a tensor of the output's shape is filled
    with ``bernoulli(1 - p)`` from the global CPU generator and divided by ``1 - p``, once per layer below
    the top, in layer order. Here the same draws are made from ``rng_state`` (the generator's state just
    before the module was called) and the generator is put back as it was.

    Args:
        shape: the layer output as the kernel holds it: time-major ``(T, B, D*H_out)`` for a padded input,
            ``(N, D*H_out)`` for the data of a ``PackedSequence``.

    Returns:
        ``num_layers - 1`` float32 masks of ``shape``.
    """
    saved = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    try:
        return [torch.empty(shape).bernoulli_(1 - p).div_(1 - p) for _ in range(num_layers - 1)]
    finally:
        torch.set_rng_state(saved)


def batch_first_masks(masks: list[Tensor], packed=None, total_length: int | None = None) -> list[Tensor]:
    """Masks from :func:`cpu_dropout_masks` as :func:`reference_rnn` takes them, ``(B, T, D*H_out)``.

    ``packed``: the ``PackedSequence`` the module was called with (its data's layout), else ``None``.
    """
    from torch.nn.utils.rnn import pad_packed_sequence

    if packed is None:
        return [m.transpose(0, 1) for m in masks]
    return [pad_packed_sequence(packed._replace(data=m), batch_first=True, total_length=total_length)[0]
            for m in masks]
