"""Findings: each rule fires on a model built to show it and stays silent on a healthy one; where findings
show (``findings``, the ``rnnviz/findings`` text, one console line when one appears or clears,
``summary.json``), and that they survive a resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_rnnviz import RNNViz
from lightning_rnnviz.probe.records import RNNRecord
from lightning_rnnviz.render.findings import KINDS, RULES, Finding, ModuleEpoch, check
from lightning_rnnviz.render.gradients import grad_stats
from tests.helpers.events import RunEvents
from tests.helpers.namespace import ModelCheckpoint, TensorBoardLogger, pl

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*", "ignore:.*log_every_n_steps.*",
    "ignore:.*val_dataloader.*", "ignore:.*Checkpoint directory.*",
    "ignore:RNNViz. NaN/Inf in:lightning_rnnviz.probe.probe.RNNVizWarning",  # the nonfinite cases
)
T, FEATURES, HIDDEN = 24, 4, 16


class Probe(pl.LightningModule):
    """A recurrent (or attention) block and a linear head; ``lr=0`` keeps the built-in pathology."""

    def __init__(self, net: nn.Module, loss: str = "last", nan_at: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.nan_at = nan_at
        width = net.embed_dim if isinstance(net, nn.MultiheadAttention) else net.hidden_size
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, nn.MultiheadAttention):
            out, _ = self.net(x, x, x, need_weights=False)
        else:
            out, _ = self.net(x)
        y = self.head(out).squeeze(-1)  # (B, T)
        return y[:, -1] if self.loss == "last" else y.mean(-1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if self.nan_at is not None and self.global_step == self.nan_at:
            x = x.clone()
            x[0, 0, 0] = float("nan")
        loss = self(x).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():  # lr=0 still turns a NaN gradient into NaN weights: keep them finite
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _data(x: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
    x = torch.randn(16, T, FEATURES, generator=torch.Generator().manual_seed(0)) if x is None else x
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)


def _fit(tmp_path: Path, model: pl.LightningModule, data=None, epochs: int = 2, **trainer) -> tuple:
    cb = RNNViz(every_n_steps=1, validation=False, histograms=False, strict=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = pl.Trainer(max_epochs=epochs, log_every_n_steps=1, logger=logger, callbacks=[cb], enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, **trainer)
    t.fit(model, data or _data())
    return cb, t


def _rnn(kind: str = "RNN", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return getattr(nn, kind)(FEATURES, HIDDEN, batch_first=True, **kwargs)


def _healthy_rnn() -> nn.Module:
    """A tanh RNN with orthogonal recurrent weights and small inputs: neither vanishing nor exploding."""
    net = _rnn()
    with torch.no_grad():
        nn.init.orthogonal_(net.weight_hh_l0)
        net.weight_ih_l0.mul_(0.3)
    return net


def _vanishing() -> nn.Module:
    net = _rnn()
    with torch.no_grad():
        net.weight_hh_l0.mul_(0.3)  # contracts: ||dL/dh_t|| shrinks about threefold per step back
    return net


def _exploding() -> nn.Module:
    net = _rnn(nonlinearity="relu")
    with torch.no_grad():
        net.weight_hh_l0.copy_(1.3 * torch.eye(HIDDEN))
        net.weight_ih_l0.abs_().mul_(0.1)
        net.bias_ih_l0.fill_(0.1)
        net.bias_hh_l0.zero_()
    return net


def _forget_stuck() -> nn.Module:
    net = _rnn("LSTM")
    with torch.no_grad():
        net.bias_ih_l0[HIDDEN : 2 * HIDDEN] = -12.0  # forget gate closed: the cell forgets every step
    return net


def _saturated() -> nn.Module:
    net = _rnn("GRU")
    with torch.no_grad():
        net.weight_ih_l0.mul_(40.0)
        net.bias_ih_l0[: 2 * HIDDEN] = -20.0  # reset and update gates near 0: the new state is tanh of big inputs
    return net


def _dead() -> nn.Module:
    net = _rnn(nonlinearity="relu")
    with torch.no_grad():
        net.bias_ih_l0.fill_(-50.0)  # every unit below zero, at every step
    return net


def _attention(scale: float) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(FEATURES, 2, batch_first=True)
    with torch.no_grad():
        attn.in_proj_weight[: 2 * FEATURES].mul_(scale)  # the query and key projections
    return attn


def _collapsed() -> tuple[nn.MultiheadAttention, torch.Tensor]:
    """Every query puts its weight on key 0: key 0 is large along the one direction every query looks."""
    attn = _attention(1.0)
    with torch.no_grad():
        attn.in_proj_weight.zero_()
        attn.in_proj_bias.zero_()
        attn.in_proj_weight[:FEATURES, 0] = 0.0
        attn.in_proj_bias[:FEATURES] = 3.0  # every query is (3, 3, 3, 3)
        attn.in_proj_weight[FEATURES : 2 * FEATURES] = torch.eye(FEATURES)
        attn.in_proj_weight[2 * FEATURES :] = torch.eye(FEATURES)
    x = 0.1 * torch.randn(16, T, FEATURES, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 4.0
    return attn, x


CASES = {
    "vanishing_gradient": lambda: (Probe(_vanishing()), None),
    "exploding_gradient": lambda: (Probe(_exploding()), None),
    "gate_saturated": lambda: (Probe(_forget_stuck(), loss="all"), None),
    "hidden_saturated": lambda: (Probe(_saturated(), loss="all"), None),
    "dead_units": lambda: (Probe(_dead(), loss="all"), None),
    "attention_collapse": lambda: (Probe(_collapsed()[0], loss="all"), _data(_collapsed()[1])),
    "attention_uniform": lambda: (Probe(_attention(0.0), loss="all"), None),
    "nonfinite": lambda: (Probe(_healthy_rnn(), loss="all", nan_at=1), None),
}


def test_every_kind_has_a_case():
    assert set(CASES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_rule_fires_on_a_model_built_to_show_it(tmp_path, kind):
    model, data = CASES[kind]()
    cb, _ = _fit(tmp_path, model, data)
    kinds = {f.kind for f in cb.findings}
    assert kind in kinds, [(f.kind, f.where, f.value, f.threshold) for f in cb.findings]
    finding = next(f for f in cb.findings if f.kind == kind)
    assert finding.module == "net" and finding.message and finding.epoch in (0, 1)
    if kind not in ("nonfinite",):
        assert (finding.head is not None) == kind.startswith("attention")
        assert (finding.layer == 0) != kind.startswith("attention")
    if kind == "vanishing_gradient":
        assert finding.value < finding.threshold == RULES["vanishing_horizon"][0] * T


@pytest.mark.parametrize("net", ["rnn", "lstm", "gru", "attention"])
def test_healthy_models_show_nothing(tmp_path, net):
    build = {"rnn": _healthy_rnn, "lstm": lambda: _rnn("LSTM"), "gru": lambda: _rnn("GRU"),
             "attention": lambda: _attention(3.0)}[net]
    cb, _ = _fit(tmp_path, Probe(build(), loss="all"))
    assert cb.findings == [], [(f.kind, f.where, f.value) for f in cb.findings]


def _exploding_tanh() -> nn.Module:
    """A vanilla (tanh) RNN with its recurrent weights scaled up: orthogonal, times 3."""
    net = _rnn()
    with torch.no_grad():
        nn.init.orthogonal_(net.weight_hh_l0)
        net.weight_hh_l0.mul_(3.0)
    return net


def test_exploding_fires_on_a_tanh_rnn_with_scaled_up_recurrent_weights(tmp_path):
    cb, _ = _fit(tmp_path, Probe(_exploding_tanh()), epochs=1)
    found = [f for f in cb.findings if f.kind == "exploding_gradient"]
    assert len(found) == 1, [(f.kind, f.where, f.value) for f in cb.findings]
    assert found[0].value >= 2 and found[0].threshold == RULES["exploding"][0] == 1.0
    assert f"grows 10^{found[0].value:.1f} times over the {T - 1} steps back" in found[0].message


def _curve_epoch(curve: list[float]) -> tuple[ModuleEpoch, dict[str, float]]:
    """One recording of a one-layer RNN whose mean ``||dL/dh_t||`` is ``curve``, as the rules read it."""
    steps = len(curve)
    grad = torch.zeros(1, 1, steps, 1)
    grad[0, 0, :, 0] = torch.tensor(curve)
    record = RNNRecord("rnn", "RNN_TANH", torch.full((1, 1, steps, 1), 0.5), {}, grad, None, None, torch.tensor([steps]))
    stats = grad_stats(record)
    return ModuleEpoch("RNN_TANH", ["layer 0"], stats={k: [v] for k, v in stats.items()}, length=float(steps),
                       recordings=1), stats


@pytest.mark.parametrize("curve", [
    [12.0, 6.0, 3.0, 1.6, 1.1] + [1.0] * 25,  # a loss on every step: the first step gathers every later one's
    [1.0] * 29 + [1 / 12],                     # the last step alone low
    [12.0] + [1.0] * 28 + [1.0 / 1.2],         # both ends
], ids=["first_steps_high", "last_step_low", "both_ends"])
def test_a_curve_flat_but_for_its_ends_is_not_exploding(curve):
    """darts' RNNModel: first over last 10^1.08, against a threshold of 1, with the curve flat from step 5
    to 28. The rule fits the whole curve, not its two ends."""
    epoch, stats = _curve_epoch(curve)
    assert stats["log10_ratio"] >= 1.0  # what the rule read before
    assert check("rnn", epoch, epoch=0) == []


def test_a_curve_growing_all_the_way_back_is_exploding():
    epoch, stats = _curve_epoch([1.12 ** (29 - t) for t in range(30)])
    (finding,) = check("rnn", epoch, epoch=0)
    assert finding.kind == "exploding_gradient" and finding.layer == 0
    assert finding.value == pytest.approx(29 * stats["decay_per_step"]) == pytest.approx(29 * 0.0492, abs=1e-3)
    assert finding.message.startswith("||dL/dh_t|| grows 10^1.4 times over the 29 steps back to the first "
                                      "(10^0.049 per step, fitted over the whole sequence)")


def test_findings_show_as_text_console_lines_and_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cb, trainer = _fit(tmp_path, Probe(_vanishing()), epochs=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning_rnnviz: epoch")]
    # one line when it appears, none for the epochs it stays
    assert len(lines) == 1 and lines[0].startswith("lightning_rnnviz: epoch 0: vanishing_gradient in 'net' layer 0")
    assert [f.epoch for f in cb.findings] == [0, 1, 2]
    events = RunEvents(trainer.logger.log_dir)
    texts = events.Tensors("rnnviz/findings")
    assert [t.step for t in texts] == [2, 4, 6]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert table.startswith("**Epoch 0** (step 2): 1 finding") and "| vanishing gradient | `net` | layer 0 |" in table
    summary = json.loads((Path(trainer.logger.log_dir) / "rnnviz" / "summary.json").read_text())
    assert summary["format"] == "lightning_rnnviz.summary" and sorted(summary["modules"]["net"]["epochs"]) == ["0", "1", "2"]
    epoch = summary["modules"]["net"]["epochs"]["2"]
    assert epoch["horizon"][0] < 12 and epoch["decay_per_step"][0] < -0.05 and len(epoch["grad_norm"][0]) == T
    assert [Finding.from_dict(f).kind for f in summary["findings"]] == ["vanishing_gradient"] * 3


def test_a_finding_that_clears_is_said_once(tmp_path, caplog):
    """The NaN comes in the first epoch only: one line when it appears, one when it is gone."""
    caplog.set_level(logging.INFO)
    cb, _ = _fit(tmp_path, Probe(_healthy_rnn(), loss="all", nan_at=0), epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning_rnnviz: epoch")]
    assert [line.split(":")[1].strip() for line in lines] == ["epoch 0", "epoch 1"]
    assert "nonfinite in 'net'" in lines[0] and lines[1].endswith("cleared (it was there in epoch 0).")


def test_findings_survive_resume(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = RNNViz(every_n_steps=1, validation=False, histograms=False)
    trainer = pl.Trainer(max_epochs=1, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path, name="tb"),
                         callbacks=[first, ckpt], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Probe(_vanishing()), _data())
    assert [f.epoch for f in first.findings] == [0]
    resumed = RNNViz(every_n_steps=1, validation=False, histograms=False)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path, name="tb"),
                         callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Probe(_vanishing()), _data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [f.epoch for f in resumed.findings] == [0, 1]
    assert resumed.findings[0] == first.findings[0]
    summary = json.loads((Path(trainer.logger.log_dir) / "rnnviz" / "summary.json").read_text())
    assert sorted(summary["modules"]["net"]["epochs"]) == ["0", "1"]  # the first run's epoch is kept
