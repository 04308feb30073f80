"""The records of the forecasting libraries' recurrent modules, in a real fit, against an independent
step-by-step reference with the lengths the batch really had.

A test callback records one training batch with ``Probe`` and, beside it, taps each recurrent module with
hooks of its own: every call's input, initial state, ``lengths`` argument, a copy of the module as it was
at the call (the optimizer changes it afterwards), the CPU generator's state before the call (inter-layer
dropout) and the upstream gradients its outputs received. The reference (``tests/helpers/reference.py``)
unrolls each call one sequence at a time to that sequence's own length in float64, with the dropout masks
drawn again from that state in the layout the module packed, and back-propagates the tapped upstream
gradients; calls chained from one another (DeepAR's encoder and decoder) are laid end to end per sequence,
as the record lays them.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_rnnviz import Probe
from tests.helpers.forecasting import MODELS, build
from tests.helpers.reference import batch_first_masks, cpu_dropout_masks, reference_rnn

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        r"ignore:Attribute '(loss|logging_metrics)' is an instance of `nn.Module` and is already saved"
        r":UserWarning"
    ),
    # neuralforecast keeps its model arguments, callbacks included, as hyperparameters: the test's own
    # callback class is local, so Lightning drops it from them and says so
    pytest.mark.filterwarnings(r"ignore:Attribute 'callbacks' removed from hparams:UserWarning"),
]

RECORDED_BATCH = 1
# Where the test callback leaves what it found: neuralforecast deep-copies the callbacks it is given.
_FOUND: dict[str, dict] = {}
_ids = itertools.count()


def _callback(namespace: str, names: tuple[str, ...]):
    """A Callback of ``namespace`` that records batch ``RECORDED_BATCH`` with ``Probe`` and taps ``names``."""
    if namespace == "lightning.pytorch":
        from lightning.pytorch import Callback
    else:
        from pytorch_lightning import Callback
    key = f"run{next(_ids)}"
    _FOUND[key] = {"calls": {n: [] for n in names}}

    class RecordOneBatch(Callback):
        def __init__(self) -> None:
            self.key = key

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step != RECORDED_BATCH:
                return
            found = _FOUND[self.key]
            modules = dict(pl_module.named_modules())
            self.handles = []
            for name in names:
                self.handles += _tap(modules[name], found["calls"][name])
            self.block = Probe(pl_module, modules=list(names), strict=True).record()
            found["recording"] = self.block.__enter__()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            block = getattr(self, "block", None)
            if block is not None:
                block.__exit__(None, None, None)
                for handle in self.handles:
                    handle.remove()
                self.block = None

    return RecordOneBatch(), key


def _tap(module: torch.nn.Module, calls: list) -> list:
    states = []

    def pre(m, args, kwargs):
        states.append(torch.get_rng_state())

    def hook(m, args, kwargs, output):
        x = args[0] if args else kwargs["input"]  # darts' TFT calls its LSTMs with keywords
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        lengths = kwargs.get("lengths")
        out, hidden = output
        h_n, c_n = hidden if isinstance(hidden, tuple) else (hidden, None)
        call = {
            "module": copy.deepcopy(m), "x": x.detach().clone(), "rng": states.pop(),
            "hx": None if hx is None else tuple(t.detach().clone() for t in (hx if isinstance(hx, tuple) else (hx,))),
            "lengths": None if lengths is None else lengths.detach().cpu().clone(), "grads": {},
        }
        for key, t in (("output", out), ("h_n", h_n), ("c_n", c_n)):
            if t is not None and t.requires_grad:
                t.register_hook(lambda g, k=key, c=call: c["grads"].__setitem__(k, g.detach().clone()))
        calls.append(call)

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(hook, with_kwargs=True)]


def _reference(call: dict):
    """The call unrolled per sequence, the tapped upstream gradients back-propagated; ``(ref, lengths)``."""
    module, x = call["module"], call["x"]
    x = x if module.batch_first else x.transpose(0, 1)
    batch, steps = x.shape[:2]
    lengths = call["lengths"] if call["lengths"] is not None else torch.full((batch,), steps)
    masks = None
    if module.training and module.dropout > 0 and module.num_layers > 1:
        dirs = 2 if module.bidirectional else 1
        width = dirs * module.hidden_size
        if call["lengths"] is not None:
            packed = pack_padded_sequence(x, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
            drawn = cpu_dropout_masks(call["rng"], module.num_layers, (packed.data.shape[0], width), module.dropout)
            masks = batch_first_masks(drawn, packed, steps)
        else:
            drawn = cpu_dropout_masks(call["rng"], module.num_layers, (steps, batch, width), module.dropout)
            masks = batch_first_masks(drawn)
    hx = call["hx"]
    ref = reference_rnn(module, x, lengths, None if hx is None else hx[0],
                        None if hx is None or len(hx) < 2 else hx[1], dropout_masks=masks)
    grads = call["grads"]
    loss = ref.output.new_zeros(())
    if "output" in grads:
        g = grads["output"] if module.batch_first else grads["output"].transpose(0, 1)
        loss = loss + (ref.output[:, : g.shape[1]] * g.double()).sum()
    for key, value in (("h_n", ref.h_n), ("c_n", ref.c_n)):
        if key in grads:
            g = grads[key].double()
            if call["lengths"] is not None:
                g = g.masked_fill((lengths == 0).view(1, -1, 1), 0)  # the module returned its initial state
            loss = loss + (value * g).sum()
    loss.backward()
    return ref, lengths


def _laid(parts: list[torch.Tensor], lengths: list[torch.Tensor]) -> torch.Tensor:
    rows, batch = parts[0].shape[:2]
    total = int(sum(lengths).max())
    out = torch.zeros(rows, batch, total, parts[0].shape[-1], dtype=torch.float64)
    for b in range(batch):
        at = 0
        for part, n in zip(parts, lengths):
            out[:, b, at : at + int(n[b])] = part[:, b, : int(n[b])]
            at += int(n[b])
    return out


@pytest.mark.parametrize("name", ["pf_deepar", "pf_recurrent", "pf_tft", "darts_rnn", "darts_block_rnn", "darts_tft",
                                  "nf_lstm", "nf_gru", "nf_tft"])
def test_records_equal_the_reference_with_the_batchs_lengths(name, tmp_path):
    model = MODELS[name]
    pytest.importorskip(model.library)
    namespace = "lightning.pytorch" if model.library == "pytorch_forecasting" else "pytorch_lightning"
    callback, key = _callback(namespace, model.recurrent)
    torch.set_num_threads(1)
    build(name, [callback], tmp_path)
    found = _FOUND.pop(key)
    recording = found["recording"]
    for module_name in model.recurrent:
        calls = found["calls"][module_name]
        record = recording[module_name]
        assert record.exact, (module_name, record.notes)
        shown = [calls[i] for i in record.calls[0]]
        refs = [_reference(call) for call in shown]
        lengths = [n for _, n in refs]
        assert record.lengths.tolist() == sum(lengths).tolist()
        hidden = _laid([r.hidden() for r, _ in refs], lengths)
        grads = _laid([r.hidden_grad() for r, _ in refs], lengths)
        torch.testing.assert_close(record.hidden.double(), hidden, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(record.hidden_grad.double(), grads, rtol=1e-3, atol=1e-7)
        if name in ("pf_deepar", "pf_recurrent"):
            # the encoder and the decoder as one sequence, lengths varying within the batch
            assert record.calls == ((0, 1), 2) and len(set(lengths[0].tolist())) > 1
