"""Inter-layer dropout of fused RNNs in training mode: replayed with the module's own masks on the CPU.

The reference (``tests/helpers/reference.py``) gets its masks independently of the probe: drawn with
``bernoulli_`` from the generator state a pre-hook of the test took before the call. That they are the
module's masks is checked first: the float64 reference with them reproduces the module's output.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lightning_rnnviz.probe.replay as replay_module
from lightning_rnnviz import Probe, RNNVizWarning
from lightning_rnnviz.probe.replay import LayerWeights, replay_with_dropout
from lightning_rnnviz.render import common
from tests.helpers.cases import KINDS, RNNConfig, RNNInputs, build_rnn, loss_for, make_inputs, rows_and_sizes
from tests.helpers.checks import GRAD_TOL, VAL_TOL, assert_matches, close
from tests.helpers.reference import batch_first_masks, cpu_dropout_masks, reference_rnn

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")

# layers, bidirectional, batch_first, packing ("padded", "unsorted", "sorted"), given_hx
STRUCTURES = [
    (2, False, True, "padded", False),
    (3, True, False, "padded", True),
    (3, False, True, "unsorted", True),
    (2, True, True, "sorted", False),
    (3, True, False, "unsorted", False),
    (2, False, False, "sorted", True),
]
GRID = [
    (RNNConfig(kind=k, num_layers=nl, bidirectional=bi, batch_first=bf, packed=pk != "padded", given_hx=hx,
               loss="mixed", dropout=0.4, batch=4, time=6, seed=3), pk)
    for k in KINDS
    for (nl, bi, bf, pk, hx) in STRUCTURES
]


def _sorted_by_length(inp: RNNInputs) -> RNNInputs:
    order = torch.sort(inp.lengths, descending=True, stable=True).indices
    pick = (lambda t: None if t is None else t[:, order])
    return RNNInputs(inp.x[order], inp.lengths[order], pick(inp.h0), pick(inp.c0))


class _Snapshots:
    """The test's own pre-hook: the generator state before each call (``get_rng_state`` draws nothing)."""

    def __init__(self, module: nn.Module):
        self.states: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(lambda m, a: self.states.append(torch.get_rng_state()))

    def remove(self):
        self.handle.remove()


def _call(module, inp: RNNInputs, packing: str, input_grad: bool = False):
    """Call ``module`` as a user would; return ``(output (B, T, D*P), h_n, c_n, packed input or None)``.

    ``input_grad``: the input requires grad, as the output of an embedding or a layer below would.
    """
    T = inp.x.shape[1]
    dtype = module.weight_ih_l0.dtype
    x = inp.x if module.batch_first else inp.x.transpose(0, 1).contiguous()
    x = x.to(dtype).requires_grad_(input_grad)
    packed = None
    if packing != "padded":
        packed = pack_padded_sequence(x, inp.lengths, batch_first=module.batch_first,
                                      enforce_sorted=packing == "sorted")
        x = packed
    h0, c0 = (None if t is None else t.to(dtype) for t in (inp.h0, inp.c0))
    hx = None if h0 is None else ((h0, c0) if isinstance(module, nn.LSTM) else h0)
    out, state = module(x, hx)
    if packed is not None:
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    elif not module.batch_first:
        out = out.transpose(0, 1)
    h_n, c_n = state if isinstance(module, nn.LSTM) else (state, None)
    return out, h_n, c_n, packed


def _reference_masks(module, inp: RNNInputs, state: torch.Tensor, packed) -> list[torch.Tensor]:
    rows, h_out, _ = rows_and_sizes(module)
    width = (2 if module.bidirectional else 1) * h_out
    B, T = inp.x.shape[:2]
    shape = (packed.data.shape[0], width) if packed is not None else (T, B, width)
    masks = cpu_dropout_masks(state, module.num_layers, shape, module.dropout)
    return batch_first_masks(masks, packed, T)


def _dropout_case(cfg: RNNConfig, packing: str, grad: bool = True, dtype=torch.float32, input_grad=False,
                  frozen_layer0=False, **record_kw):
    module = build_rnn(cfg).to(dtype).train()
    if frozen_layer0:
        for name, param in module.named_parameters():
            param.requires_grad_("_l0" not in name)
    inp = make_inputs(cfg, module)
    if packing == "sorted":
        inp = _sorted_by_length(inp)
    loss_fn = loss_for(cfg, module, inp)
    snapshots = _Snapshots(module)
    torch.manual_seed(cfg.seed + 100)
    try:
        with Probe(module, strict=True).record(**record_kw) as rec:
            with torch.set_grad_enabled(grad):
                out, h_n, c_n, packed = _call(module, inp, packing, input_grad)
            if grad:
                loss_fn(out, h_n, c_n).backward()
    finally:
        snapshots.remove()
    masks = _reference_masks(module, inp, snapshots.states[0], packed)
    ref = reference_rnn(module, inp.x, inp.lengths, inp.h0, inp.c0, dropout_masks=masks)
    if grad:
        loss_fn(ref.output, ref.h_n, ref.c_n).backward()
    # the masks drawn for the reference are the module's: with them, the reference gives its output
    torch.testing.assert_close(ref.output.float(), out.detach().float(), **VAL_TOL)
    return rec[""], ref, module, out.detach()


@pytest.mark.parametrize(("cfg", "packing"), GRID, ids=lambda c: c if isinstance(c, str) else c.describe())
def test_dropout_record_is_exact_and_matches_the_reference(cfg, packing):
    r, ref, module, out = _dropout_case(cfg, packing)
    assert r.notes == ()
    assert_matches(r, ref)  # exact=True, every state, gate and total gradient through the masks
    # the top layer is the module's output itself
    D = r.num_directions
    top = torch.cat([r.hidden[r.num_layers * D - D + d] for d in range(D)], dim=-1)
    assert torch.equal(top, out)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(KINDS),
    num_layers=st.integers(2, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    packing=st.sampled_from(["padded", "unsorted", "sorted"]),
    given_hx=st.booleans(),
    batch=st.integers(1, 4),
    time=st.integers(1, 6),
    input_size=st.integers(1, 4),
    hidden_size=st.integers(2, 5),
    dropout=st.sampled_from([0.1, 0.5]),
    double=st.booleans(),
    input_grad=st.booleans(),
    frozen_layer0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dropout_record_matches_the_reference_property(packing, double, input_grad, frozen_layer0, **kw):
    """float64 modules, inputs that require grad and frozen layers change how the kernel rounds: the
    replay must still give the module's output bit for bit (or the record could not say exact)."""
    if kw["kind"] == "LSTM_PROJ":
        kw["proj_size"] = kw["hidden_size"] - 1
    cfg = RNNConfig(packed=packing != "padded", loss="mixed", **kw)
    r, ref, _, _ = _dropout_case(cfg, packing, dtype=torch.float64 if double else torch.float32,
                                 input_grad=input_grad, frozen_layer0=frozen_layer0)
    assert_matches(r, ref)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH", "LSTM_PROJ"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_first", [True, False])
def test_realistic_sizes_are_exact(kind, dtype, batch_first):
    """Sizes where the matrix products take their blocked paths (the reference would be slow here)."""
    cfg = RNNConfig(kind=kind, num_layers=3, bidirectional=True, batch_first=batch_first, dropout=0.2,
                    batch=16, time=30, input_size=32, hidden_size=64, proj_size=32, seed=4)
    module = build_rnn(cfg).to(dtype).train()
    inp = make_inputs(cfg, module)
    with Probe(module, strict=True).record(max_samples=4) as rec:
        out, h_n, _, _ = _call(module, inp, "padded", input_grad=True)
        (out.square().sum() + h_n.sum()).backward()
    assert rec[""].exact is True, rec[""].notes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packing", ["padded", "unsorted"])
def test_replayed_top_layer_is_bit_equal_to_the_module_output(kind, packing):
    """The claim the exact flag rests on, checked on the replay function itself."""
    cfg = RNNConfig(kind=kind, num_layers=3, bidirectional=True, batch_first=True, packed=packing != "padded",
                    given_hx=True, dropout=0.3, batch=5, time=7, seed=11)
    module = build_rnn(cfg).train()
    inp = make_inputs(cfg, module)
    snapshots = _Snapshots(module)
    out, _, _, packed = _call(module, inp, packing)
    snapshots.remove()
    # as at the call: weights that require grad, the input in the module's layout
    weights = {n: p.detach().requires_grad_(p.requires_grad) for n, p in module.named_parameters()}
    layers = [[LayerWeights.from_flat(weights, layer, d) for d in range(2)] for layer in range(3)]
    h0, c0 = inp.h0, inp.c0
    if packed is not None:
        h0 = h0[:, packed.sorted_indices]
        c0 = None if c0 is None else c0[:, packed.sorted_indices]
        x, batch_sizes = packed.data, packed.batch_sizes
    else:
        x, batch_sizes = inp.x, None  # batch-first, as given
    before = torch.get_rng_state()
    result = replay_with_dropout(module.mode, layers, x, h0, c0, module.dropout, snapshots.states[0],
                                 batch_sizes, batch_first=True)
    assert torch.equal(torch.get_rng_state(), before)  # the generator is back where it was
    if packed is not None:
        top = pack_padded_sequence(out, inp.lengths, batch_first=True, enforce_sorted=False).data
    else:
        top = out.transpose(0, 1)
    assert torch.equal(result.outputs[-1], top.detach())
    assert len(result.masks) == 2
    kept = torch.tensor(1 / (1 - module.dropout)).item()  # in float32
    for mask in result.masks:
        assert set(mask.unique().tolist()) <= {0.0, kept}


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTM_PROJ"])
@pytest.mark.parametrize("packing", ["padded", "unsorted"])
@pytest.mark.parametrize("k", [1, 3])
def test_max_samples_replays_the_full_batch_then_slices(kind, packing, k):
    cfg = RNNConfig(kind=kind, num_layers=3, bidirectional=True, packed=packing != "padded", given_hx=True,
                    loss="mixed", dropout=0.5, batch=5, time=6, seed=5)
    r, ref, _, _ = _dropout_case(cfg, packing, max_samples=k)
    assert r.exact is True and r.batch == k
    close(r.hidden, ref.hidden()[:, :k], "hidden[:k]", VAL_TOL)
    for name, value in ref.gates().items():
        close(r.gates[name], value[:, :k], f"gates[{name}][:k]", VAL_TOL)
    close(r.hidden_grad, ref.hidden_grad()[:, :k], "hidden_grad[:k]", GRAD_TOL)
    if r.cell is not None:
        close(r.cell_grad, ref.cell_grad()[:, :k], "cell_grad[:k]", GRAD_TOL)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_RELU"])
def test_forward_without_autograd_in_training_mode_is_exact(kind):
    """oneDNN rounds differently with and without autograd: the replay runs in the call's grad mode."""
    cfg = RNNConfig(kind=kind, num_layers=3, bidirectional=True, dropout=0.3, batch=3, time=5, seed=1)
    r, ref, _, _ = _dropout_case(cfg, "unsorted", grad=False)
    assert_matches(r, ref, grads=False)


def test_unbatched_and_float64_inputs_are_exact():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        module = nn.LSTM(3, 4, num_layers=2, dropout=0.5).to(dtype).train()
        x = torch.randn(6, 3, dtype=dtype)  # unbatched (T, I)
        snapshots = _Snapshots(module)
        with Probe(module, strict=True).record() as rec:
            out, (h_n, c_n) = module(x)
            (out.sum() + h_n.sum()).backward()
        snapshots.remove()
        masks = batch_first_masks(cpu_dropout_masks(snapshots.states[0], 2, (6, 1, 4), 0.5))
        ref = reference_rnn(module, x.unsqueeze(0), dropout_masks=masks)
        (ref.output.sum() + ref.h_n.sum()).backward()
        assert_matches(rec[""], ref)


# --------------------------------------------------------------------------------------------------
# where the masks are not known: approximate, with the reason
# --------------------------------------------------------------------------------------------------


def _note_fits_a_subtitle(note: str) -> None:
    assert note.endswith(".") and note[0].isupper(), note
    title = common.compose_title("rnn: hidden state h_t, sequence 0", {"exact": False, "notes": (note,)}, 10)
    subtitle = title.split("\n")[1:]
    assert len(subtitle) <= 2, subtitle  # wrapped onto at most two lines, never cut
    assert " ".join(subtitle) == f"(approximate: {note})"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_masks_drawn_by_someone_else_make_the_record_approximate(kind):
    """A user's pre-hook registered after the probe's draws from the generator before the kernel does:
    the replayed masks are not the module's, the top layer differs, and the record says so."""
    cfg = RNNConfig(kind=kind, num_layers=2, dropout=0.5, loss="all", seed=2)
    module = build_rnn(cfg).train()
    inp = make_inputs(cfg, module)
    loss_fn = loss_for(cfg, module, inp)
    def draw(module, args):
        torch.rand(3)

    torch.manual_seed(123)
    with Probe(module).record() as rec:
        handle = module.register_forward_pre_hook(draw)
        out, h_n, c_n, _ = _call(module, inp, "padded")
        handle.remove()
        loss_fn(out, h_n, c_n).backward()
    r = rec[""]
    assert r.exact is False
    assert len(r.notes) == 1 and "did not give the module's output bit for bit" in r.notes[0]
    _note_fits_a_subtitle(r.notes[0])
    rows, h_out, _ = rows_and_sizes(module)
    assert tuple(r.hidden.shape) == (rows, cfg.batch, cfg.time, h_out)
    # layer 0 comes before any dropout: its states are still the true ones
    ref = reference_rnn(module, inp.x)
    torch.testing.assert_close(r.hidden[0], ref.hidden()[0].float(), **VAL_TOL)


def test_output_changed_in_place_makes_the_record_approximate():
    torch.manual_seed(0)
    module = nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True).train()
    x = torch.randn(2, 5, 3)
    with Probe(module).record() as rec, torch.no_grad():
        out, _ = module(x)
        out.mul_(1.0)
    r = rec[""]
    assert r.exact is False and "changed in place" in r.notes[0]
    _note_fits_a_subtitle(r.notes[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN's own dropout state)")
def test_cuda_dropout_is_approximate_and_says_why():
    torch.manual_seed(0)
    module = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True).cuda().train()
    x = torch.randn(2, 5, 3, device="cuda")
    with Probe(module).record() as rec:
        out, _ = module(x)
        out.sum().backward()
    r = rec[""]
    assert r.exact is False and "cuDNN" in r.notes[0]
    _note_fits_a_subtitle(r.notes[0])


def test_every_approximation_note_is_a_sentence_that_fits_a_subtitle():
    from lightning_rnnviz.probe.build import _dropout_note

    for reason in ("cuda", "differs", "in_place", "no_state"):
        _note_fits_a_subtitle(_dropout_note(0.25, reason))


# --------------------------------------------------------------------------------------------------
# never perturb: several training steps, with the replay succeeding and failing
# --------------------------------------------------------------------------------------------------


class DropoutModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, dropout=0.3, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 5, num_layers=3, dropout=0.4)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(5, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        out, h = self.gru(self.drop(out).transpose(0, 1))
        return self.head(out[-1]) + h.sum(0).sum(-1, keepdim=True)


def _train(steps: int, record_every: int | None, probe_kw=None):
    """``steps`` SGD steps from fixed seeds, recording every ``record_every``-th; what training gave."""
    torch.manual_seed(0)
    model = DropoutModel().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(model, **(probe_kw or {})) if record_every else None
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1234)
    losses, grads, recordings = [], [], []
    for step in range(steps):
        x = torch.randn(4, 6, 4, generator=g)
        lengths = torch.tensor([6, 2, 5, 3])
        block = probe.record(max_samples=3) if probe is not None and step % record_every == 0 else None
        with block if block is not None else _nothing() as rec:
            loss = model(x, lengths).square().mean()
            optimizer.zero_grad()
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
        losses.append(loss.detach())
        recordings.append(rec)
    params = [p.detach().clone() for p in model.parameters()]
    return losses, grads, params, torch.get_rng_state(), recordings


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _assert_same_training(a, b):
    for la, lb in zip(a[0], b[0]):
        assert torch.equal(la, lb)
    for ga, gb in zip(a[1], b[1]):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert torch.equal(a[3], b[3]), "the global CPU generator is not where training without the probe left it"


@pytest.mark.parametrize("record_every", [1, 2])
def test_training_with_dropout_is_bit_identical_and_the_rng_stream_untouched(record_every):
    plain = _train(4, None)
    probed = _train(4, record_every)
    _assert_same_training(plain, probed)
    recorded = [rec for rec in probed[4] if rec is not None]
    assert len(recorded) == (4 if record_every == 1 else 2)
    for rec in recorded:
        assert set(rec) == {"lstm", "gru"} and not rec.errors
        assert rec["lstm"].exact and rec["gru"].exact, (rec["lstm"].notes, rec["gru"].notes)


def test_a_replay_that_raises_leaves_the_rng_stream_untouched(monkeypatch):
    """The replay draws from the generator and then fails: the record is dropped with a warning, and the
    generator is where training without the probe left it."""
    plain = _train(3, None)
    fused_layer = replay_module._fused_layer
    calls = []

    def failing(mode, *args, **kwargs):
        calls.append(mode)
        if mode == "LSTM" and calls.count("LSTM") == 2:  # the LSTM's second layer, after its first mask
            torch.rand(100)
            raise RuntimeError("replay exploded")
        return fused_layer(mode, *args, **kwargs)

    monkeypatch.setattr(replay_module, "_fused_layer", failing)
    expected = r"could not replay module 'lstm' \(RuntimeError: replay exploded\)"
    with pytest.warns(RNNVizWarning, match=expected):
        probed = _train(3, 1)
    _assert_same_training(plain, probed)
    assert "lstm" in probed[4][0].errors and set(probed[4][0]) == {"gru"}


def test_pre_hook_only_where_dropout_can_apply_and_only_inside_the_block():
    plain, dropping = nn.LSTM(3, 4, num_layers=2), nn.LSTM(3, 4, num_layers=2, dropout=0.2)
    single = nn.GRU(3, 4, dropout=0.0)
    model = nn.ModuleDict({"plain": plain, "dropping": dropping, "single": single})
    with Probe(model).record():
        assert not plain._forward_pre_hooks and not single._forward_pre_hooks
        assert len(dropping._forward_pre_hooks) == 1
    assert not dropping._forward_pre_hooks
