"""The fused-kernel backward of ``replay_rnn`` (``method="fused"``, the GPU path) against the loop and the
float64 step-by-step reference.

On the CPU ``method="auto"`` is the loop, so the probe-level tests force the fused path with a fixture that
also counts that it ran. ``replay_rnn`` is called directly in float64 to compare the two methods tightly
(``rtol=1e-10``); through the probe, records are compared with the reference at the usual tolerances.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_rnnviz.probe.replay as replay_module
from lightning_rnnviz import Probe
from lightning_rnnviz.probe.replay import LayerWeights, ReplayResult, auto_method, replay_rnn, tf32_off
from tests.helpers.cases import (
    KINDS,
    STRUCTURES,
    RNNConfig,
    build_rnn,
    loss_for,
    make_inputs,
    rows_and_sizes,
    run_rnn,
)
from tests.helpers.checks import GRAD_TOL, assert_matches
from tests.helpers.checks import close as _close
from tests.helpers.reference import reference_rnn
from tests.probe.test_dropout import GRID as DROPOUT_GRID
from tests.probe.test_dropout import _dropout_case
from tests.probe.test_exact_rnn import GRID as EXACT_GRID
from tests.probe.test_exact_rnn import _record_case

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")

LOSSES = ("all", "final", "last", "mixed")
TIGHT = {"rtol": 1e-10}
HAS_PRECISION_API = hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision")

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _replay_args(cfg: RNNConfig, loss: str, dtype=torch.float64, dropout: bool = False,
                 device: str = "cpu") -> dict:
    """``replay_rnn``'s arguments for ``cfg``: time-major inputs, upstream gradients shaped by ``loss``
    (zero at padded steps, ``h_n``/``c_n`` seeds at each sequence's own last step) and, with
    ``dropout``, inter-layer masks of ``0`` or ``1 / (1 - p)``."""
    module = build_rnn(cfg).to(dtype)
    inp = make_inputs(cfg, module)
    rows, out_size, hidden = rows_and_sizes(module)
    dirs = 2 if cfg.bidirectional else 1
    gen = torch.Generator().manual_seed(500 + cfg.seed)
    x = inp.x.transpose(0, 1).to(dtype)
    steps, batch = x.shape[:2]
    valid = (torch.arange(steps).unsqueeze(1) < inp.lengths.unsqueeze(0)).unsqueeze(-1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    grad_output = grad_h_n = grad_c_n = None
    if loss in ("all", "mixed"):
        grad_output = randn(steps, batch, dirs * out_size) * valid
    if loss in ("last", "mixed"):
        at_last = torch.zeros(steps, batch, dirs * out_size, dtype=dtype)
        at_last[inp.lengths - 1, torch.arange(batch)] = randn(batch, dirs * out_size)
        grad_output = at_last if grad_output is None else grad_output + at_last
    if loss in ("final", "mixed"):
        grad_h_n = randn(rows, batch, out_size)
        grad_c_n = randn(rows, batch, hidden) if module.mode == "LSTM" else None
    h0 = inp.h0.to(dtype) if inp.h0 is not None else torch.zeros(rows, batch, out_size, dtype=dtype)
    c0 = None
    if module.mode == "LSTM":
        c0 = inp.c0.to(dtype) if inp.c0 is not None else torch.zeros(rows, batch, hidden, dtype=dtype)
    masks = None
    if dropout and cfg.num_layers > 1:
        p = 0.4
        masks = [(torch.rand(steps, batch, dirs * out_size, generator=gen) > p).to(dtype) / (1 - p)
                 for _ in range(cfg.num_layers - 1)]
    flat = {n: w.detach() for n, w in module.named_parameters()}
    weights = [[LayerWeights.from_flat(flat, layer, d) for d in range(dirs)]
               for layer in range(cfg.num_layers)]
    args = {"mode": module.mode, "weights": weights, "x": x, "h0": h0, "c0": c0,
            "lengths": inp.lengths if cfg.packed else None, "grad_output": grad_output, "grad_h_n": grad_h_n,
            "grad_c_n": grad_c_n, "dropout_masks": masks}
    return _moved(args, lambda t: t.to(device))


def _moved(args: dict, fn) -> dict:
    """``args`` with ``fn`` applied to every tensor, also those inside the weights and masks."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return fn(v)
        if isinstance(v, LayerWeights):
            parts = (v.w_ih, v.w_hh, v.b_ih, v.b_hh, v.w_hr)
            return LayerWeights(*(None if t is None else fn(t) for t in parts))
        if isinstance(v, list):
            return [one(u) for u in v]
        return v
    return {k: one(v) for k, v in args.items()}


def _assert_same(loop: ReplayResult, fused: ReplayResult, lengths: torch.Tensor | None, tol=TIGHT,
                 same_states: bool = True) -> None:
    """States, gates and gradients agree to ``tol``, relative to each quantity's largest value, and are zero
    at padded steps. (States to rounding, not bit for bit: below the top layer, the fused method takes the
    states from the kernel pass whose backward it runs, which has an extra zero input; the loop from the
    kernel on the layer's own input. ``same_states=False``: the states to ``tol`` only, unscaled.)"""
    states = [("hidden", loop.hidden, fused.hidden), ("cell", loop.cell, fused.cell)]
    assert loop.gates.keys() == fused.gates.keys()
    states += [(name, loop.gates[name], fused.gates[name]) for name in loop.gates]
    for name, expected, actual in states:
        assert (expected is None) == (actual is None), name
        if expected is None:
            continue
        if same_states:
            _assert_close_scaled(actual, expected, tol, name, lengths)
        else:
            torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["rtol"])
    for name in ("hidden_grad", "cell_grad"):
        expected, actual = getattr(loop, name), getattr(fused, name)
        assert (expected is None) == (actual is None), name
        if expected is None:
            continue
        _assert_close_scaled(actual, expected, tol, name, lengths)


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: dict, name: str,
                         lengths: torch.Tensor | None) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    atol = tol["rtol"] * float(expected.abs().max().clamp_min(1e-30))
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=atol,
                               msg=lambda m, name=name: f"{name}: {m}")
    assert not actual.requires_grad and actual.grad_fn is None
    if lengths is not None:
        steps = actual.shape[1]
        padded = torch.arange(steps, device=actual.device).unsqueeze(1) >= lengths.to(actual.device)
        assert not actual[:, padded].any(), f"{name}: nonzero at padded steps"


def _check(args: dict, tol=TIGHT) -> None:
    loop, fused = _both(args)
    _assert_same(loop, fused, args["lengths"], tol)


def _both(args: dict) -> tuple[ReplayResult, ReplayResult]:
    return replay_rnn(**args, method="loop"), replay_rnn(**args, method="fused")


@pytest.fixture
def fused(monkeypatch):
    """The probe's ``method="auto"`` takes the fused path here; ``.calls`` counts the fused backwards."""
    spy = _Counter(replay_module._backward_fused)
    monkeypatch.setattr(replay_module, "auto_method", lambda device: "fused")
    monkeypatch.setattr(replay_module, "_backward_fused", spy)
    return spy


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _precision_state() -> tuple[list, list]:
    """Every TF32-related setting: the legacy values (``"raises"`` where unreadable) and each
    ``fp32_precision``."""
    backends = torch.backends
    legacy = []
    for read in (lambda: backends.cudnn.allow_tf32, lambda: backends.cuda.matmul.allow_tf32,
                 torch.get_float32_matmul_precision):
        try:
            legacy.append(read())
        except RuntimeError:
            legacy.append("raises")
    return legacy, [m.fp32_precision for m in replay_module._precision_settings()]


def _set_precision_state(state: tuple[list, list]) -> None:
    (cudnn, matmul, precision), values = state
    if cudnn != "raises":
        torch.backends.cudnn.allow_tf32 = cudnn
    if precision != "raises":
        torch.set_float32_matmul_precision(precision)
    elif matmul != "raises":
        torch.backends.cuda.matmul.allow_tf32 = matmul
    for setting, value in zip(replay_module._precision_settings(), values):
        setting.fp32_precision = value


@pytest.fixture
def precision_settings():
    """Whatever a test does to the TF32 settings, the next test starts from the settings before it."""
    state = _precision_state()
    yield state
    _set_precision_state(state)
    assert _precision_state() == state


def _flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


# --------------------------------------------------------------------------------------------------
# the two methods on replay_rnn directly, float64
# --------------------------------------------------------------------------------------------------

GRID = [
    (RNNConfig(kind=k, num_layers=nl, bidirectional=bi, batch_first=bf, bias=b, packed=pk, given_hx=hx,
               batch=4, time=6), loss, dropout)
    for k in KINDS
    for (nl, bi, bf, b, pk, hx, _) in STRUCTURES
    for loss in LOSSES
    for dropout in ([False, True] if nl > 1 else [False])
]


@pytest.mark.parametrize(("cfg", "loss", "dropout"), GRID,
                         ids=lambda v: v.describe()[:-4] if isinstance(v, RNNConfig) else str(v))
def test_fused_equals_loop_float64(cfg, loss, dropout):
    _check(_replay_args(cfg, loss, dropout=dropout))


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(KINDS),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    bias=st.booleans(),
    packed=st.booleans(),
    given_hx=st.booleans(),
    loss=st.sampled_from(LOSSES),
    dropout=st.booleans(),
    top=st.booleans(),
    batch=st.integers(1, 5),
    time=st.integers(1, 8),
    input_size=st.integers(1, 5),
    hidden_size=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_loop_property(loss, dropout, top, **kw):
    if kw["kind"] == "LSTM_PROJ":
        kw["proj_size"] = kw["hidden_size"] - 1
    args = _replay_args(RNNConfig(**kw), loss, dropout=dropout)
    if top:
        # as the probe passes them: the top layer's states known, that layer needs no forward
        known = replay_rnn(**{**args, "grad_output": None, "grad_h_n": None, "grad_c_n": None})
        dirs = 2 if kw["bidirectional"] else 1
        args["top_states"] = torch.cat(list(known.hidden[-dirs:]), dim=-1)
    _check(args)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_loop_at_blocked_matmul_sizes(kind):
    """Sizes where the matrix products and the kernel take their blocked paths."""
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=True, given_hx=True, batch=9, time=40,
                    input_size=24, hidden_size=48, proj_size=20, seed=2)
    _check(_replay_args(cfg, "mixed", dropout=True))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_float32_close_to_loop(kind):
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=True, given_hx=True, batch=4, time=7)
    _check(_replay_args(cfg, "mixed", dtype=torch.float32, dropout=True), tol={"rtol": 1e-5})


def test_method_is_checked_and_auto_picks_by_device():
    args = _replay_args(RNNConfig(kind="GRU", num_layers=2, packed=True), "mixed")
    with pytest.raises(ValueError, match=r"`method` must be one of 'auto', 'loop', 'fused', got 'cudnn'"):
        replay_rnn(**args, method="cudnn")
    assert auto_method(torch.device("cpu")) == "loop"
    assert auto_method(torch.device("cuda")) == "fused"
    auto, loop = replay_rnn(**args), replay_rnn(**args, method="loop")
    assert torch.equal(auto.hidden_grad, loop.hidden_grad)


# --------------------------------------------------------------------------------------------------
# through the probe, fused path forced, against the float64 reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", EXACT_GRID, ids=lambda c: c.describe())
def test_fused_record_matches_reference(fused, cfg):
    r, ref, _, _ = _record_case(cfg)
    assert_matches(r, ref)
    assert fused.calls == 1


@pytest.mark.parametrize(("cfg", "packing"), DROPOUT_GRID,
                         ids=lambda c: c if isinstance(c, str) else c.describe())
def test_fused_record_with_dropout_matches_reference(fused, cfg, packing):
    """The recorded inter-layer masks: the fused path multiplies each lower layer's ``g`` by the same
    mask / (1 - p) the loop does."""
    r, ref, _, _ = _dropout_case(cfg, packing)
    assert r.notes == ()
    assert_matches(r, ref)
    assert fused.calls == 1


@pytest.mark.parametrize("kind", ["LSTM", "LSTM_PROJ", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_fused_record_with_max_samples(fused, kind, k):
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=True, batch=4, time=5, given_hx=True,
                    loss="mixed", seed=21)
    part, ref, _, _ = _record_case(cfg, max_samples=k)
    keep = min(k, cfg.batch)
    assert part.batch == keep
    _close(part.hidden_grad, ref.hidden_grad()[:, :keep], "hidden_grad[:k]", GRAD_TOL)
    if part.cell_grad is not None:
        _close(part.cell_grad, ref.cell_grad()[:, :keep], "cell_grad[:k]", GRAD_TOL)
    assert fused.calls == 1


@pytest.mark.parametrize("outer", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_RELU"])
def test_fused_record_when_the_block_exits_without_autograd(fused, outer, kind):
    """The probe replays at block exit, in whatever mode the caller is in there: the fused path builds its
    graph all the same (copying inference tensors into normal ones) and leaves the mode as it was."""
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=True, given_hx=True, loss="mixed")
    module = build_rnn(cfg)
    inp = make_inputs(cfg, module)
    loss_fn = loss_for(cfg, module, inp)
    with torch.no_grad() if outer == "no_grad" else torch.inference_mode():
        with Probe(module).record() as rec, torch.inference_mode(False), torch.enable_grad():
            out, h_n, c_n = run_rnn(module, inp, cfg.packed)
            loss_fn(out, h_n, c_n).backward()
        assert not torch.is_grad_enabled()
        assert torch.is_inference_mode_enabled() == (outer == "inference_mode")
    ref = reference_rnn(module, inp.x, inp.lengths, inp.h0, inp.c0)
    loss_fn(ref.output, ref.h_n, ref.c_n).backward()
    assert_matches(rec[""], ref)
    assert fused.calls == 1


# --------------------------------------------------------------------------------------------------
# never perturb
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_inference_tensors_in_inference_mode(kind):
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=True, given_hx=True)
    args = _replay_args(cfg, "mixed", dropout=True)
    with torch.inference_mode():
        frozen = _moved(args, torch.clone)
        assert frozen["x"].is_inference() and frozen["weights"][0][0].w_ih.is_inference()
        loop, fused = _both(frozen)
        assert torch.is_inference_mode_enabled()
    _assert_same(loop, fused, args["lengths"])


@pytest.mark.parametrize("outer", ["enabled", "no_grad", "inference_mode"])
def test_fused_leaves_grad_modes_rng_and_the_callers_tensors_alone(outer):
    """Parameters that require grad passed straight in: no ``.grad`` appears, no global draw happens, the
    grad mode is the caller's afterwards and the result holds no graph."""
    torch.manual_seed(0)
    module = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=4)
    weights = [[LayerWeights.from_flat(dict(module.named_parameters()), layer, d) for d in range(2)]
               for layer in range(2)]
    x = torch.randn(6, 3, 3, requires_grad=True)
    h0 = torch.randn(4, 3, 4, requires_grad=True)
    c0 = torch.randn(4, 3, 5, requires_grad=True)
    grad_output = torch.randn(6, 3, 8, requires_grad=True)
    grad_h_n, grad_c_n = torch.randn(4, 3, 4), torch.randn(4, 3, 5)
    rng = torch.get_rng_state()
    ctx = {"enabled": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with ctx[outer]():
        before = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        result = replay_rnn("LSTM", weights, x, h0, c0, torch.tensor([6, 2, 4]), grad_output, grad_h_n,
                            grad_c_n, method="fused")
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == before
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in module.parameters())
    assert all(t.grad is None for t in (x, h0, c0, grad_output))
    for t in (result.hidden_grad, result.cell_grad):
        assert not t.requires_grad and t.grad_fn is None


def test_fused_graph_is_freed_by_the_replay():
    """Everything our graph saved for its backward is released before ``replay_rnn`` returns."""
    saved: list[weakref.ref] = []

    class Saved:
        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Saved(t)
        saved.append(weakref.ref(box))
        return box

    args = _replay_args(RNNConfig(kind="LSTM", num_layers=3, bidirectional=True, packed=True), "mixed")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        result = replay_rnn(**args, method="fused")
    gc.collect()
    assert saved, "the fused path built no graph"
    alive = sum(ref() is not None for ref in saved)
    assert alive == 0, f"{alive} of {len(saved)} saved tensors alive"
    assert result.hidden_grad is not None


def test_fused_path_keeps_kernel_warnings_out_of_the_users_log():
    """oneDNN warns that it has no projected LSTM, also in the backward; cuDNN (on a GPU) that the weights
    are not one flat buffer. Neither reaches the user."""
    cfg = RNNConfig(kind="LSTM_PROJ", num_layers=2, bidirectional=True, packed=True, given_hx=True)
    args = _replay_args(cfg, "mixed", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay_rnn(**args, method="fused")


@pytest.mark.parametrize("message", replay_module._KERNEL_WARNINGS)
def test_kernel_warnings_ignored_for_our_calls_only(message):
    """Scoped filters, not ``catch_warnings`` (not thread-safe): the kernels' warnings raised by the
    replay's calls (or the autograd call it runs a backward through) are ignored, also under a filter
    added since that turns warnings into errors; the same warning raised by the user's own code is not."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("error")  # the user's, or pytest's
        replay_module._quiet_kernel_warnings()
        for module in ("lightning_rnnviz.probe.replay", "torch.autograd.graph"):
            warnings.warn_explicit(f"{message} (ours)", UserWarning, "x.py", 1, module=module)
        warnings.simplefilter("always")  # put before ours: the next replay call puts ours back in front
        replay_module._quiet_kernel_warnings()
        count = len(warnings.filters)
        replay_module._quiet_kernel_warnings()
        assert len(warnings.filters) == count  # once in front, left alone
        warnings.warn_explicit(f"{message} (ours again)", UserWarning, "x.py", 1,
                               module="lightning_rnnviz.probe.replay")
        warnings.warn_explicit(f"{message} (the user's)", UserWarning, "x.py", 1, module="user_model")
    assert [str(w.message) for w in seen] == [f"{message} (the user's)"]


def _flag_spy(monkeypatch, seen: list, fail: bool = False):
    original = replay_module._layer_backward

    def spy(*args, **kwargs):
        seen.append(_flags())
        if fail:
            raise RuntimeError("kernel failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(replay_module, "_layer_backward", spy)


@pytest.mark.parametrize("user", [(True, True), (True, False), (False, False)])
def test_tf32_off_during_the_fused_replay_and_restored(monkeypatch, precision_settings, user):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = user
    seen: list = []
    _flag_spy(monkeypatch, seen)
    args = _replay_args(RNNConfig(kind="GRU", num_layers=2, packed=True), "mixed")
    replay_rnn(**args, method="fused")
    assert seen == [(False, False)] * 2
    assert _flags() == user
    replay_rnn(**args, method="loop")  # the loop runs in the user's settings and does not touch them
    assert _flags() == user


def test_tf32_settings_restored_when_the_fused_replay_raises(monkeypatch, precision_settings):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    seen: list = []
    _flag_spy(monkeypatch, seen, fail=True)
    args = _replay_args(RNNConfig(kind="LSTM", num_layers=2), "all")
    with pytest.raises(RuntimeError, match="kernel failed"):
        replay_rnn(**args, method="fused")
    assert seen == [(False, False)]
    assert _flags() == (True, True)


_SETTERS = {
    "legacy cudnn off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "legacy cudnn on": lambda: setattr(torch.backends.cudnn, "allow_tf32", True),
    "legacy matmul on": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "matmul medium": lambda: torch.set_float32_matmul_precision("medium"),
    "matmul high": lambda: torch.set_float32_matmul_precision("high"),
}
if HAS_PRECISION_API:
    _SETTERS.update({
        "rnn ieee": lambda: setattr(torch.backends.cudnn.rnn, "fp32_precision", "ieee"),
        "conv tf32": lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "tf32"),
        "matmul tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
        "cudnn ieee": lambda: setattr(torch.backends.cudnn, "fp32_precision", "ieee"),
        "all tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
        "mkldnn matmul bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    })


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(sorted(_SETTERS)), max_size=4))
def test_tf32_off_restores_any_mix_of_legacy_and_per_operator_settings(precision_settings, steps):
    """Also settings the legacy flags cannot express (reading them raises) come back exactly; inside, each
    legacy query that worked before works and says "no TF32", so no kernel's query raises there."""
    _set_precision_state(precision_settings)
    for step in steps:
        _SETTERS[step]()
    before = _precision_state()
    args = _replay_args(RNNConfig(kind="LSTM", num_layers=2, bidirectional=True), "all", dtype=torch.float32)
    with tf32_off():
        inside = _precision_state()
        replay_rnn(**args, method="fused")
    assert _precision_state() == before
    for was, now in zip(before[0][:2], inside[0][:2]):
        assert now is False or was == "raises", (before, inside)
    if HAS_PRECISION_API:
        rnn, conv, matmul = (torch.backends.cudnn.rnn, torch.backends.cudnn.conv, torch.backends.cuda.matmul)
        names = replay_module._precision_settings()
        for module in (rnn, conv, matmul):
            assert inside[1][names.index(module)] == "ieee"


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN's fused backward)")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_loop_on_cuda(kind, dtype, precision_settings):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    cfg = RNNConfig(kind=kind, num_layers=3, bidirectional=True, packed=True, given_hx=True, batch=6, time=9)
    args = _replay_args(cfg, "mixed", dtype=dtype, dropout=True, device="cuda")
    cuda_rng = torch.cuda.get_rng_state()
    fused = replay_rnn(**args)  # "auto" on CUDA
    with tf32_off():
        loop = replay_rnn(**args, method="loop")
    _assert_same(loop, fused, args["lengths"], tol={"rtol": 1e-10 if dtype == torch.float64 else 1e-4},
                 same_states=False)
    assert _flags() == (True, True)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)


# --------------------------------------------------------------------------------------------------
# a ReLU pre-activation of exactly 0: the loop takes the kernel's own derivative there
# --------------------------------------------------------------------------------------------------

# The configuration check_cuda.py failed on an H100 (fused vs loop 1.5e-2): no bias, no initial state and
# dropped-out inputs leave some pre-activations at exactly 0, where cuDNN's ReLU passes the gradient.
RELU_AT_ZERO = RNNConfig(kind="RNN_RELU", num_layers=3, bidirectional=True, batch_first=True, bias=False,
                         packed=True, given_hx=False, batch=4, time=9, input_size=5, hidden_size=7)


class _ReluPassingZero(torch.autograd.Function):
    """ReLU whose derivative at exactly 0 is 1, as cuDNN's RNN backward takes it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x >= 0).to(grad.dtype)


def _relu_reference(cfg: RNNConfig, args: dict) -> torch.Tensor:
    """Total ``dL/dh_t`` ``(L*D, T, B, P)`` of ``_replay_args``' loss (``"final"``) from the float64
    step-by-step reference."""
    module = build_rnn(cfg).double()
    inp = make_inputs(cfg, module)
    masks = [m.transpose(0, 1) for m in args["dropout_masks"]]
    ref = reference_rnn(module, inp.x.double(), inp.lengths, dropout_masks=masks)
    (ref.h_n * args["grad_h_n"]).sum().backward()
    return ref.hidden_grad().transpose(1, 2)


def test_relu_kernel_convention_asked_once_per_device_and_dtype(monkeypatch):
    monkeypatch.setattr(replay_module, "_RELU_AT_ZERO", {})
    for dtype in (torch.float32, torch.float64):
        # PyTorch's CPU kernel back-propagates nothing through a pre-activation of exactly 0
        assert replay_module.relu_passes_zero(torch.device("cpu"), dtype) is False
    assert set(replay_module._RELU_AT_ZERO) == {(torch.device("cpu"), torch.float32),
                                                (torch.device("cpu"), torch.float64)}


@pytest.mark.parametrize("passes_zero", [False, True])
def test_loop_takes_the_kernels_relu_derivative_at_zero(monkeypatch, passes_zero):
    """The loop against the float64 reference with either convention, on a case where they differ: the
    CPU kernel's (derivative 0 at 0; the loop equals the fused path here) and cuDNN's (1; asked of the
    kernel on CUDA, set here since the CPU kernel says 0)."""
    args = _replay_args(RELU_AT_ZERO, "final", dropout=True)
    default_loop = replay_rnn(**args, method="loop")
    monkeypatch.setitem(replay_module._RELU_AT_ZERO, (torch.device("cpu"), torch.float64), passes_zero)
    loop = replay_rnn(**args, method="loop")
    if passes_zero:
        import tests.helpers.reference as reference

        monkeypatch.setattr(reference, "relu", _ReluPassingZero.apply)
        # the case really has pre-activations of exactly 0: the two conventions differ by about 1.5e-2
        gap = (loop.hidden_grad - default_loop.hidden_grad).abs().max() / default_loop.hidden_grad.abs().max()
        assert 1e-2 < gap < 2e-2
    else:
        _assert_same(loop, replay_rnn(**args, method="fused"), args["lengths"])
    expected = _relu_reference(RELU_AT_ZERO, args)
    torch.testing.assert_close(loop.hidden_grad, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


# --------------------------------------------------------------------------------------------------
# the recurrences as scans: log2(T) levels, not T steps
# --------------------------------------------------------------------------------------------------


def _sequential(direct: torch.Tensor, carry: torch.Tensor, later: bool) -> torch.Tensor:
    out, acc = torch.empty_like(direct), torch.zeros_like(direct[0])
    for t in range(direct.shape[0] - 1, -1, -1) if later else range(direct.shape[0]):
        acc = direct[t] + carry[t] * acc
        out[t] = acc
    return out


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 8, 9, 100])
@pytest.mark.parametrize("later", [True, False])
@pytest.mark.parametrize("width", [5, 4000])  # the doubling, and the CPU's step loop for large steps
def test_linear_recurrence_equals_the_step_loop(steps, later, width):
    gen = torch.Generator().manual_seed(steps)
    direct = torch.randn(steps, 2, width, generator=gen, dtype=torch.float64)
    carry = torch.rand(steps, 2, width, generator=gen, dtype=torch.float64)
    carry[steps // 2] = 0  # a mask's zero cuts the carry
    kept = direct.clone(), carry.clone()
    out = replay_module.linear_recurrence(direct, carry, later)
    expected = _sequential(direct, carry, later)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(direct, kept[0]) and torch.equal(carry, kept[1])  # inputs untouched
    # written over `direct` (the replay's own temporaries), or into a buffer given: the same values
    given = torch.empty_like(direct)
    assert replay_module.linear_recurrence(direct, carry, later, out=given) is given
    assert torch.equal(given, out) and torch.equal(direct, kept[0])
    assert replay_module.linear_recurrence(direct, carry, later, out=direct) is direct
    assert torch.equal(direct, out) and torch.equal(carry, kept[1])


class _OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_fused_path_recurrences_grow_like_log2_t(monkeypatch, kind):
    """The operations the fused path issues for its recurrences (the LSTM's cell states and ``dL/dc_t``,
    the GRU's ``dL/dh_t``), counted at the dispatcher for T = 8, 64, 512: the same number more for each
    3 more levels, not 8 times as many; small steps, where the CPU too takes the doubling."""
    counts = {}
    real = replay_module.linear_recurrence
    for steps in (8, 64, 512):
        mode = _OpCount()

        def counted(*args, mode=mode, **kwargs):
            with mode:
                return real(*args, **kwargs)

        monkeypatch.setattr(replay_module, "linear_recurrence", counted)
        cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=True, packed=True, batch=2, time=steps,
                        input_size=3, hidden_size=4)
        replay_rnn(**_replay_args(cfg, "mixed"), method="fused")
        counts[steps] = mode.ops
    assert 0 < counts[8] < counts[64] < counts[512]
    # 3, 6 and 9 levels: each 3 more add the same operations, and 64 times the steps take under 4 times
    # the operations (a step loop: 64 times)
    assert counts[512] - counts[64] == counts[64] - counts[8]
    assert counts[512] < 4 * counts[8]


# the extra input's width per direction: the state's (projected: P = 3), the GRU's twice (H = 5)
@pytest.mark.parametrize("kind, extra", [("LSTM", 5), ("LSTM_PROJ", 3), ("GRU", 10), ("RNN_TANH", 5),
                                         ("RNN_RELU", 5)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_kernel_runs_on_an_extra_input_as_wide_as_the_state(monkeypatch, kind, extra, bidirectional):
    """The kernel's backward gives what each step passes back through an extra input as wide as the state
    (the GRU's twice: its candidate gate needs its own part), not one as wide as every gate together (4H
    for an LSTM), whose input matmuls cost 2-4 times the layer's own work forward and back."""
    widths: list[int] = []
    real = replay_module._fused_call

    def spy(mode, weights, x, *args, train=False, **kwargs):
        widths.append(x.shape[-1] if train else None)
        return real(mode, weights, x, *args, train=train, **kwargs)

    monkeypatch.setattr(replay_module, "_fused_call", spy)
    cfg = RNNConfig(kind=kind, num_layers=2, bidirectional=bidirectional, packed=True)
    replay_rnn(**_replay_args(cfg, "mixed"), method="fused")
    dirs = 2 if bidirectional else 1
    state = 3 if kind == "LSTM_PROJ" else 5
    # Each layer through the kernel once, with the extra input: that pass's forward gives the layer's
    # states (no plain forward besides), its backward the gradients. Layer 0 reads the module's input,
    # layer 1 layer 0's states.
    assert widths == [cfg.input_size + dirs * extra, dirs * state + dirs * extra]
    # Where the top layer's states are given (the module's output), its pass runs for the backward alone.
    args = _replay_args(cfg, "mixed")
    top = replay_rnn(**args, method="loop").hidden[-dirs:]  # (D, T, B, P)
    widths.clear()
    replay_rnn(**args, top_states=torch.cat(list(top), dim=-1), method="fused")
    assert widths == [cfg.input_size + dirs * extra, dirs * state + dirs * extra]
