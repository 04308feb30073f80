"""Findings: each rule fires on a model built to show it, once its condition persists, and stays silent on a
healthy one; the advice fits the module's kind and every number is named; where findings show (``findings``,
the ``rnnviz/findings`` text with ``||dL/dh_t||`` as written, one console line when one appears or clears,
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
from lightning_rnnviz.render import findings as findings_
from lightning_rnnviz.render.findings import KINDS, RULES, Finding, ModuleEpoch, Persistence, check
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
    """Two recordings an epoch: a condition is reported at the second epoch (2 checks, 4 recordings);
    ``attention_uniform`` leaves out the module's first check, so at the third; ``nonfinite`` at once."""
    model, data = CASES[kind]()
    epochs = 3 if kind == "attention_uniform" else 2
    cb, _ = _fit(tmp_path, model, data, epochs=epochs)
    kinds = {f.kind for f in cb.findings}
    assert kind in kinds, [(f.kind, f.where, f.value, f.threshold) for f in cb.findings]
    finding = next(f for f in cb.findings if f.kind == kind)
    assert finding.module == "net" and finding.message
    assert (finding.epoch, finding.since) == ((0, 0) if kind == "nonfinite" else (epochs - 1, epochs - 2))
    assert "threshold" in finding.message  # each number of the message is named, the threshold too
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
    cb, _ = _fit(tmp_path, Probe(_exploding_tanh()), epochs=2)
    found = [f for f in cb.findings if f.kind == "exploding_gradient"]
    assert len(found) == 1, [(f.kind, f.where, f.value) for f in cb.findings]
    assert found[0].value >= 2 and found[0].threshold == RULES["exploding"][0] == 1.0
    assert found[0].message.startswith(f"growth of ||dL/dh_t|| back to the first step 10^{found[0].value:.1f} "
                                       f"(decay_per_step +")
    assert f"over {T - 1} steps, a line fitted to the whole sequence) >= threshold 10^1:" in found[0].message
    assert "orthogonal or smaller recurrent weights" in found[0].message  # a tanh RNN's advice


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
    assert finding.message.startswith("growth of ||dL/dh_t|| back to the first step 10^1.4 (decay_per_step "
                                      "+0.049 over 29 steps, a line fitted to the whole sequence) >= threshold 10^1")


def test_findings_show_as_text_console_lines_and_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cb, trainer = _fit(tmp_path, Probe(_vanishing()), epochs=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning_rnnviz: epoch")]
    # one line when it is reported (it has held since epoch 0), none for the epochs it stays
    assert len(lines) == 1 and lines[0].startswith(
        "lightning_rnnviz: epoch 1: vanishing_gradient in 'net' layer 0 (held since epoch 0): gradient horizon ")
    assert [f.epoch for f in cb.findings] == [1, 2] and {f.since for f in cb.findings} == {0}
    events = RunEvents(trainer.logger.log_dir)
    texts = events.Tensors("rnnviz/findings")
    assert [t.step for t in texts] == [2, 4, 6]
    first, second = (t.tensor_proto.string_val[0].decode() for t in texts[:2])
    # epoch 0: nothing reported, but what holds is shown as not reported yet
    assert first.startswith("**Epoch 0** (step 2): no findings.") and "Not reported yet" in first
    assert "- vanishing gradient in `net` layer 0, since epoch 0: gradient horizon" in first
    assert second.startswith("**Epoch 1** (step 4): 1 finding") and "Not reported yet" not in second
    assert "| vanishing gradient | `net` | layer 0 | 0 | gradient horizon " in second
    text = (Path(trainer.logger.log_dir) / "rnnviz" / "summary.json").read_text()
    assert text == json.dumps(cb._reporter.summary_document(), separators=(",", ":"), allow_nan=False)
    summary = json.loads(text)
    assert summary["format"] == "lightning_rnnviz.summary" and sorted(summary["modules"]["net"]["epochs"]) == ["0", "1", "2"]
    epoch = summary["modules"]["net"]["epochs"]["2"]
    assert epoch["horizon"][0] < 12 and epoch["decay_per_step"][0] < -0.05 and len(epoch["grad_norm"][0]) == T
    assert [Finding.from_dict(f).kind for f in summary["findings"]] == ["vanishing_gradient"] * 2
    assert summary["pending"] == []


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
    assert first.findings == [] and [f.kind for f in first._reporter.pending] == ["vanishing_gradient"]
    resumed = RNNViz(every_n_steps=1, validation=False, histograms=False)
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path, name="tb"),
                         callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Probe(_vanishing()), _data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # the first run's check counts: the condition has held at two checks (4 recordings) by epoch 1
    assert [(f.epoch, f.since) for f in resumed.findings] == [(1, 0)]
    summary = json.loads((Path(trainer.logger.log_dir) / "rnnviz" / "summary.json").read_text())
    assert sorted(summary["modules"]["net"]["epochs"]) == ["0", "1"]  # the first run's epoch is kept


# --- advice per module kind ------------------------------------------------------------------------------
VANISHING = {"horizon": 3.0, "decay_per_step": -0.2, "log10_ratio": -5.8}


def _epoch(kind: str, module_kind: str = "", recordings: int = 4, **stats: float) -> ModuleEpoch:
    """One row (a layer, or a head) of one epoch's means, as the rules read them."""
    rows = ["head 0"] if kind == "attention" else ["layer 0"]
    return ModuleEpoch(kind, rows, stats={k: [v] for k, v in stats.items()}, length=30.0, recordings=recordings,
                       module_kind=module_kind)


@pytest.mark.parametrize("kind", ["RNN_TANH", "RNN_RELU", "RNNCell"])
def test_vanishing_in_a_vanilla_rnn_advises_a_gated_cell(kind):
    (finding,) = check("rnn", _epoch(kind, **VANISHING), epoch=1)
    assert "a gated cell (`nn.LSTM`, `nn.GRU`)" in finding.message


@pytest.mark.parametrize("kind, gate", [("LSTM", "forget"), ("LSTMCell", "forget"), ("GRU", "update"),
                                        ("GRUCell", "update")])
def test_vanishing_in_a_gated_cell_speaks_of_its_gate_not_of_a_gated_cell(kind, gate):
    (finding,) = check("rnn", _epoch(kind, **VANISHING, **{f"{gate}_mean": 0.42}), epoch=1)
    assert "gated cell" not in finding.message
    assert f"{gate} gate mean 0.42" in finding.message and f"{gate}-gate bias of 1 or more" in finding.message
    assert "shorter (truncated) sequences" in finding.message and "a skip connection or attention" in finding.message


SCALED = ["MultiheadAttention", "InterpretableMultiHeadAttention", "_InterpretableMultiHeadAttention"]


@pytest.mark.parametrize("module_kind", SCALED)
def test_uniform_attention_in_a_module_that_scales_is_not_told_to_scale(module_kind):
    (finding,) = check("attn", _epoch("attention", module_kind, entropy_norm=0.99), epoch=3)
    assert "scales its scores by 1/sqrt(d) already, so scaling is not the cause" in finding.message
    assert "fine where the task needs an average" in finding.message


def test_uniform_attention_in_a_custom_module_may_be_scaled_down_too_far():
    (finding,) = check("attn", _epoch("attention", "custom", entropy_norm=0.99), epoch=3)
    assert "already" not in finding.message and "scaled down less (by 1/sqrt(d), not by 1/d" in finding.message


@pytest.mark.parametrize("module_kind, scaling", [("MultiheadAttention", False), ("custom", True)])
def test_collapsed_attention_is_told_to_scale_only_where_it_may_not(module_kind, scaling):
    summary = _epoch("attention", module_kind, focus=0.97)
    summary.same_key = [1.0]
    (finding,) = check("attn", summary, epoch=1)
    assert finding.kind == "attention_collapse"
    assert ("divided by sqrt(d)" in finding.message) == scaling


def test_the_scaled_attention_classes_are_the_known_library_classes():
    from lightning_rnnviz.probe.known import KNOWN

    assert {entry.qualname for entry in KNOWN.values()} | {"MultiheadAttention"} == findings_.SCALED_ATTENTION


def test_pytorch_forecastings_attention_scales_by_default():
    sub = pytest.importorskip("pytorch_forecasting.models.temporal_fusion_transformer.sub_modules")
    assert sub.InterpretableMultiHeadAttention(n_head=2, d_model=8).attention.scale is True


def test_a_fit_hands_the_module_kind_to_the_advice(tmp_path):
    """An LSTM whose forget gate is shut: its vanishing gradient is told about its forget gate (mean 0.00),
    never to use a gated cell."""
    cb, _ = _fit(tmp_path, Probe(_forget_stuck()))
    vanishing = [f for f in cb.findings if f.kind == "vanishing_gradient"]
    assert vanishing, [(f.kind, f.where, f.value) for f in cb.findings]
    assert all("gated cell" not in f.message and "forget gate mean 0.00" in f.message for f in vanishing)


# --- persistence ------------------------------------------------------------------------------------------
def _held(epoch: int, kind: str = "vanishing_gradient", module: str = "rnn") -> list[Finding]:
    return [Finding(kind, module, epoch, 3.0, 15.0, "...", layer=None if kind.startswith("attention") else 0,
                    head=0 if kind.startswith("attention") else None)]


def _reported(rule: Persistence, checks: list[bool], kind: str = "vanishing_gradient", recordings: int = 2) -> list:
    """At which checks (epochs 0, 1, ...) a condition that holds where ``checks`` says is reported."""
    out = []
    for epoch, holds in enumerate(checks):
        reported, _ = rule.update("rnn", _held(epoch, kind) if holds else [], recordings, first=epoch == 0)
        out += [(f.epoch, f.since) for f in reported]
    return out


def test_a_condition_is_reported_once_it_has_held_at_two_checks():
    assert _reported(Persistence(), [True, True, True]) == [(1, 0), (2, 0)]


def test_a_condition_that_comes_and_goes_is_never_reported():
    assert _reported(Persistence(), [True, False, True, False]) == []
    assert _reported(Persistence(), [True, False, True, True]) == [(3, 2)]  # it starts over


def test_uniform_attention_that_clears_after_the_first_epochs_is_never_reported():
    """Uniform at epoch 0 (every head starts so) and at epoch 1, learned at epoch 2: nothing to say; today's
    rule reported it at epoch 1 and cleared it at epoch 2."""
    assert _reported(Persistence(), [True, True, False], kind="attention_uniform") == []
    assert _reported(Persistence(), [True, True, True], kind="attention_uniform") == [(2, 1)]


def test_one_recording_a_check_needs_four_checks():
    """neuralforecast's epochs are one batch each: a condition must hold over 4 recordings, not 2."""
    assert _reported(Persistence(), [True] * 5, recordings=1) == [(3, 0), (4, 0)]


def test_nonfinite_is_reported_at_once():
    assert _reported(Persistence(), [True, False], kind="nonfinite") == [(0, 0)]


def test_persistence_is_per_module_and_saved():
    rule = Persistence()
    rule.update("rnn", _held(0), 2, first=True)
    rule.update("other", [], 2, first=True)  # a check of another module leaves the rnn's run alone
    again = Persistence()
    again.load_state_dict(rule.state_dict())
    reported, pending = again.update("rnn", _held(1), 2, first=False)
    assert [(f.epoch, f.since) for f in reported] == [(1, 0)] and pending == []


def test_uniform_attention_is_not_reported_before_it_persists(tmp_path):
    """The planted uniform heads over two epochs: held at epoch 1 only (the first check does not count), so
    not reported yet, but shown as pending in the text and ``summary.json``."""
    cb, trainer = _fit(tmp_path, Probe(_attention(0.0), loss="all"), epochs=2)
    assert cb.findings == []
    assert {(f.kind, f.epoch, f.since) for f in cb._reporter.pending} == {("attention_uniform", 1, 1)}
    summary = json.loads((Path(trainer.logger.log_dir) / "rnnviz" / "summary.json").read_text())
    assert {f["kind"] for f in summary["pending"]} == {"attention_uniform"} and summary["findings"] == []


# --- named numbers ----------------------------------------------------------------------------------------
def _dead_epoch() -> ModuleEpoch:
    summary = _epoch("RNN_RELU")
    summary.dead_fraction = [0.5]
    return summary


def _collapsed_epoch() -> ModuleEpoch:
    summary = _epoch("attention", "MultiheadAttention", focus=0.97)
    summary.same_key = [0.95]
    return summary


def _nonfinite_epoch() -> ModuleEpoch:
    summary = _epoch("GRU")
    summary.nonfinite = 1
    return summary


READINGS = {
    "vanishing_gradient": (lambda: _epoch("RNN_TANH", **VANISHING),
                           "gradient horizon 3 steps < threshold 15 steps (half the mean sequence length of 30 steps), "
                           "decay_per_step -0.200 <= threshold -0.05 (log10 per step): "),
    "exploding_gradient": (lambda: _epoch("RNN_TANH", decay_per_step=0.1, horizon=30.0),
                           "growth of ||dL/dh_t|| back to the first step 10^2.9 (decay_per_step +0.100 over 29 steps, "
                           "a line fitted to the whole sequence) >= threshold 10^1: "),
    "gate_saturated": (lambda: _epoch("LSTM", forget_saturated_low=0.6, forget_mean=0.05),
                       "60% of the forget gate's activations below 0.1 (>= threshold 50%), forget gate mean 0.05: "),
    "hidden_saturated": (lambda: _epoch("GRU", saturated=0.7),
                         "70% of the states with |h| > 0.95 (>= threshold 50%): "),
    "dead_units": (_dead_epoch, "50% of the layer's units dead, |h| below 0.001 at every recorded step of the epoch "
                                "(>= threshold 10%): "),
    "attention_collapse": (_collapsed_epoch, "95% of the queries on their sample's most-attended key (>= threshold "
                                             "90%), mean largest weight (focus) 0.97 >= threshold 0.9: "),
    "attention_uniform": (lambda: _epoch("attention", "custom", entropy_norm=0.99),
                          "normalised entropy (entropy_norm) 0.99 >= threshold 0.95 (1 = uniform over the allowed "
                          "keys): "),
    "nonfinite": (_nonfinite_epoch, "1 of 4 recordings with NaN/Inf (> threshold 0): "),
}


def test_every_kind_has_a_reading():
    assert set(READINGS) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(READINGS))
def test_every_number_of_a_finding_carries_its_name(kind):
    """Each message starts with what was read: each number with its name (and unit), against its threshold."""
    build, reading = READINGS[kind]
    found = [f for f in check("m", build(), epoch=1) if f.kind == kind]
    assert len(found) == 1 and found[0].message.startswith(reading), [f.message for f in found]


# --- the Text dashboard -----------------------------------------------------------------------------------
def _table_finding() -> Finding:
    (finding,) = check("rnn", _epoch("RNN_TANH", **VANISHING), epoch=1, step=8)
    finding.since = 0
    return finding


def test_the_text_escapes_pipes_so_tensorboard_shows_the_norm_as_written():
    """TensorBoard renders the text as markdown with tables: a bare ``||dL/dh_t||`` inside a table row splits
    the cell (the old text replaced every ``|`` with ``/``). Rendered by TensorBoard's own function."""
    from tensorboard.plugin_util import markdown_to_safe_html

    finding = _table_finding()
    pending = _table_finding()
    pending.kind = "hidden_saturated"
    text = findings_.markdown([finding], 1, 8, pending=[pending])
    assert "\\|\\|dL/dh_t\\|\\|" in text and "//dL/dh_t//" not in text
    html = markdown_to_safe_html(text)
    rows = [row for row in html.split("<tr>")[1:]]
    assert len(rows) == 2 and all(row.count("<td>") + row.count("<th>") == 5 for row in rows)
    assert "<td>gradient horizon 3 steps &lt; threshold 15 steps" in html and "||dL/dh_t|| falls" in html
    assert "\\|" not in html  # no escape left over, in the table or in the pending line


def test_the_wandb_page_shows_the_norm_as_written():
    from lightning_rnnviz.sinks.wandb import markdown_html

    page = markdown_html(findings_.markdown([_table_finding()], 1, 8))
    assert page.count("<td>") == 5 and "||dL/dh_t|| falls" in page and "\\|" not in page


@pytest.mark.slow
def test_tensorboard_shows_the_norm_as_written_in_the_text_dashboard(tmp_path):
    """A real TensorBoard and a browser: the findings table's cell reads ``||dL/dh_t||``."""
    from tests.helpers import browser
    from tests.helpers.tensorboard_server import TensorBoardServer

    paths = browser.require_chromium()
    _, trainer = _fit(tmp_path / "logs", Probe(_vanishing()), epochs=2)
    with TensorBoardServer(tmp_path / "logs", loader="python") as board, browser.chromium(paths) as driver:
        [card] = browser.text_cards(driver, board, expect=1)
        assert card.tag == "rnnviz/findings"
        tables = [table for entry in card.entries for table in entry.tables]
        assert tables, card.entries
        header, row = tables[0][:2]
        assert header == ("finding", "module", "where", "since epoch", "what it says")
        assert row[:4] == ("vanishing gradient", "net", "layer 0", "0")
        assert "||dL/dh_t|| falls below 1% of its peak" in row[4] and "//" not in row[4]
        browser.screenshot(driver, tmp_path / "text.png")


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_a_gated_cell_explodes_at_a_hundredfold(kind):
    """A gated cell's curve rising about tenfold back towards the steps a task marks (the vanishing-gradients
    example's LSTM while it learns the adding problem: 10^1.07) is not an explosion; a hundredfold is."""
    for growth, fires in ((1.1, False), (2.2, True)):
        epoch, stats = _curve_epoch([10 ** (growth * (29 - t) / 29) for t in range(30)])
        epoch.kind = epoch.module_kind = kind
        found = check("rnn", epoch, epoch=0)
        assert [f.kind for f in found] == (["exploding_gradient"] if fires else []), (growth, found)
        if fires:
            assert found[0].threshold == RULES["exploding_gated"][0] == 2.0
            assert ">= threshold 10^2:" in found[0].message
