"""Say what is wrong: rules with stated thresholds over one epoch's recordings of a module.

Each rule reads the epoch's means of statistics the callback computes anyway (no extra pass over the
records) and, when it fires, makes a :class:`Finding` that names the module, the layer and direction (or
head, or gate), the value, the threshold and one sentence of what usually helps. The rules and their
thresholds are :data:`RULES`; the README lists them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = (
    "vanishing_gradient",
    "exploding_gradient",
    "gate_saturated",
    "hidden_saturated",
    "dead_units",
    "attention_collapse",
    "attention_uniform",
    "nonfinite",
)

#: name -> (threshold, how the rule reads); the thresholds the rules below use.
RULES: dict[str, tuple[float, str]] = {
    "vanishing_decay": (-0.05, "`decay_per_step` at or below -0.05 (ten times smaller every 20 steps back)"),
    "vanishing_horizon": (0.5, "and a horizon shorter than half the mean sequence length (sequences of 4+ steps)"),
    "exploding": (1.0, ("`decay_per_step` x (mean sequence length - 1) at or above 1: the least-squares line "
                        "through log10 ||dL/dh_t|| over the whole sequence rises tenfold or more from the last "
                        "processed step back to the first (a curve flat but for its ends does not fire)")),
    "gate_saturated": (0.5, "half or more of an LSTM forget gate's or GRU update gate's activations saturated at one end"),
    "hidden_saturated": (0.5, "half or more of the tanh-bounded states with |h| > 0.95"),
    "dead_unit_level": (1e-3, "a unit is dead when |h| stays below 1e-3 at every recorded step of the epoch"),
    "dead_units": (0.1, "10% or more of a layer's units dead"),
    "attention_collapse": (0.9, "a head's mean largest weight and the share of queries on their sample's most-attended key both 0.9 or more"),
    "attention_uniform": (0.95, "a head's `entropy_norm` at or above 0.95 from the second epoch on"),
    "nonfinite": (0.0, "any NaN/Inf in a recording's states, gates, gradients or attention"),
}

_HELP = {
    "vanishing_gradient": (
        "so the module can hardly learn dependencies longer than that; a gated cell (LSTM, GRU), a forget-gate "
        "bias of 1, orthogonal recurrent weights, or shorter (truncated) sequences usually help."
    ),
    "exploding_gradient": (
        "the gradient grows on its way back in time; gradient clipping (`Trainer(gradient_clip_val=1.0)`), a lower "
        "learning rate or smaller recurrent weights usually help."
    ),
    "gate_saturated": {
        ("forget", "low"): "the cell forgets its state at almost every step, so little reaches back in time; a "
                           "forget-gate bias of 1 (or more) usually helps.",
        ("forget", "high"): "the cell keeps almost all of its state and seldom takes in new input; a lower learning "
                            "rate or a smaller forget-gate bias usually helps if the model does not learn.",
        ("update", "high"): "the state is copied through almost unchanged, so new input hardly enters; a lower "
                            "learning rate or normalised inputs usually help if the model does not learn.",
        ("update", "low"): "the state is replaced at almost every step, so little is remembered; initialising the "
                           "update-gate bias positive usually helps.",
    },
    "hidden_saturated": (
        "saturated units pass almost no gradient; normalised inputs, a lower learning rate, layer normalisation "
        "or gradient clipping usually help."
    ),
    "dead_units": (
        "they take no part in the computation (typical of ReLU RNNs after a too large step); a lower learning rate, "
        "tanh, or a different initialisation usually help."
    ),
    "attention_collapse": (
        "every query looks at the same key, so attention carries no information about the query; a lower learning "
        "rate, attention dropout, or checking the masks and positional information usually help."
    ),
    "attention_uniform": (
        "the head has not learned where to look; more training, a scaled dot product (1/sqrt(d)), or checking that "
        "the keys differ from each other usually help."
    ),
    "nonfinite": (
        "training is diverging or an input holds NaN; a lower learning rate, gradient clipping, checking the data, "
        "or a GradScaler with fp16 usually help."
    ),
}


@dataclass
class Finding:
    """One thing that looks wrong in one module during one epoch.

    Attributes:
        kind: one of :data:`KINDS`.
        module: the module's qualified name.
        epoch: the training epoch.
        value: the statistic that fired the rule.
        threshold: the rule's threshold for it.
        message: what it means and what usually helps, one sentence.
        layer, direction: where in a recurrent module (``direction`` ``"forward"``/``"reverse"`` for a
            bidirectional one); ``head`` in an attention module; ``gate`` for ``gate_saturated``.
        step: the step the epoch's summary was logged at.
    """

    kind: str
    module: str
    epoch: int
    value: float
    threshold: float
    message: str
    layer: int | None = None
    direction: str | None = None
    head: int | None = None
    gate: str | None = None
    step: int | None = None

    @property
    def where(self) -> str:
        """``"layer 1 reverse"``, ``"head 2"``, ``"layer 0, forget gate"`` or ``""``."""
        parts = []
        if self.layer is not None:
            parts.append(f"layer {self.layer}" + (f" {self.direction}" if self.direction else ""))
        if self.head is not None:
            parts.append(f"head {self.head}")
        if self.gate is not None:
            parts.append(f"{self.gate} gate")
        return ", ".join(parts)

    @property
    def key(self) -> tuple:
        """What identifies the same finding from one epoch to the next."""
        return (self.kind, self.module, self.layer, self.direction, self.head, self.gate)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["value"] = float("nan") if known.get("value") is None else float(known["value"])
        known["threshold"] = float("nan") if known.get("threshold") is None else float(known["threshold"])
        return cls(**known)


@dataclass
class ModuleEpoch:
    """What one epoch's recordings of one module come to: the means over its recordings, per row (a layer
    and direction of a recurrent module, or a head of an attention module).

    Attributes:
        kind: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ..., or ``"attention"``.
        rows: one label per row (``"layer 0 reverse"``, ``"head 1"``).
        num_directions: 2 for a bidirectional module.
        stats: statistic name (``horizon``, ``forget_saturated_low``, ``entropy_norm``, ...) -> per-row mean.
        dead_fraction: per row, the share of units whose ``|h|`` never reached 1e-3 during the epoch.
        same_key: per head, the share of queries whose largest weight is on their sample's most-attended key.
        length: mean valid length of the recorded sequences.
        recordings: how many recording steps the epoch had.
        nonfinite: how many of them held NaN/Inf.
    """

    kind: str
    rows: list[str]
    num_directions: int = 1
    stats: dict[str, list[float]] = field(default_factory=dict)
    dead_fraction: list[float] = field(default_factory=list)
    same_key: list[float] = field(default_factory=list)
    length: float = float("nan")
    recordings: int = 0
    nonfinite: int = 0


def _at(values: Sequence[float] | None, row: int) -> float:
    if values is None or row >= len(values) or values[row] is None:
        return float("nan")
    return float(values[row])


def check(module: str, summary: ModuleEpoch, epoch: int, step: int | None = None) -> list[Finding]:
    """Every rule of :data:`RULES` over one module's epoch; the findings, in row order.

    Example::

        >>> epoch = ModuleEpoch("RNN_TANH", ["layer 0"], stats={"horizon": [3.0], "decay_per_step": [-0.2],
        ...                     "log10_ratio": [-5.8]}, length=30.0, recordings=4)
        >>> [(f.kind, f.value, f.threshold) for f in check("rnn", epoch, epoch=2)]
        [('vanishing_gradient', 3.0, 15.0)]
    """
    found: list[Finding] = []
    stats = summary.stats

    def add(kind: str, value: float, threshold: float, row: int | None, message: str, **where: Any) -> None:
        if summary.kind == "attention":
            where.setdefault("head", row)
        elif row is not None:
            layer, direction = divmod(row, summary.num_directions)
            where.setdefault("layer", layer)
            if summary.num_directions == 2:
                where.setdefault("direction", "reverse" if direction else "forward")
        found.append(Finding(kind, module, epoch, float(value), float(threshold), message, step=step, **where))

    if summary.nonfinite:
        add("nonfinite", summary.nonfinite, RULES["nonfinite"][0], None,
            f"{summary.nonfinite} of {summary.recordings} recordings held NaN/Inf; {_HELP['nonfinite']}")
    for row in range(len(summary.rows)):
        if summary.kind == "attention":
            focus, same = _at(stats.get("focus"), row), _at(summary.same_key, row)
            limit = RULES["attention_collapse"][0]
            if focus >= limit and same >= limit:
                add("attention_collapse", same, limit, row,
                    f"{same:.0%} of the queries put {focus:.0%} of their weight on one and the same key: "
                    f"{_HELP['attention_collapse']}")
            entropy = _at(stats.get("entropy_norm"), row)
            limit = RULES["attention_uniform"][0]
            if epoch >= 1 and entropy >= limit:
                add("attention_uniform", entropy, limit, row,
                    f"the weights are nearly uniform over the allowed keys ({entropy:.2f} of the maximum entropy): "
                    f"{_HELP['attention_uniform']}")
            continue
        decay, horizon = _at(stats.get("decay_per_step"), row), _at(stats.get("horizon"), row)
        reach = RULES["vanishing_horizon"][0] * summary.length
        if decay <= RULES["vanishing_decay"][0] and summary.length >= 4 and horizon < reach:
            add("vanishing_gradient", horizon, reach, row,
                f"||dL/dh_t|| falls below 1% of its peak {horizon:.1f} steps back (10^{decay:.2f} per step), "
                f"{_HELP['vanishing_gradient']}")
        # the growth of the line fitted through the whole curve, not the ratio of its two end points: the
        # first step of a loss on every step gathers the gradients of all later steps, the last has only its own
        growth = decay * (summary.length - 1)
        if growth >= RULES["exploding"][0]:
            add("exploding_gradient", growth, RULES["exploding"][0], row,
                f"||dL/dh_t|| grows 10^{growth:.1f} times over the {summary.length - 1:.0f} steps back to the first "
                f"(10^{decay:.3f} per step, fitted over the whole sequence): {_HELP['exploding_gradient']}")
        gate = {"LSTM": "forget", "LSTMCell": "forget", "GRU": "update", "GRUCell": "update"}.get(summary.kind)
        if gate is not None:
            limit = RULES["gate_saturated"][0]
            for end in ("low", "high"):
                share = _at(stats.get(f"{gate}_saturated_{end}"), row)
                if share >= limit:
                    near = "0" if end == "low" else "1"
                    add("gate_saturated", share, limit, row,
                        f"{share:.0%} of the {gate} gate's activations are near {near}: "
                        f"{_HELP['gate_saturated'][(gate, end)]}", gate=gate)
        saturated = _at(stats.get("saturated"), row)
        if saturated >= RULES["hidden_saturated"][0]:
            add("hidden_saturated", saturated, RULES["hidden_saturated"][0], row,
                f"{saturated:.0%} of the states are at the ends of tanh's range: {_HELP['hidden_saturated']}")
        dead = _at(summary.dead_fraction, row)
        if dead >= RULES["dead_units"][0]:
            add("dead_units", dead, RULES["dead_units"][0], row,
                f"{dead:.0%} of the units never moved from 0 this epoch: {_HELP['dead_units']}")
    return found


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def markdown(findings: Iterable[Finding], epoch: int, step: int | None = None) -> str:
    """A small markdown table of one epoch's findings, for TensorBoard's Text dashboard."""
    findings = list(findings)
    head = f"**Epoch {epoch}**" + (f" (step {step})" if step is not None else "")
    if not findings:
        return f"{head}: no findings. The rules and their thresholds are listed in the README under Diagnosis."
    lines = [f"{head}: {len(findings)} finding{'s' if len(findings) > 1 else ''}", "",
             "| finding | module | where | value | threshold | what it means |", "|---|---|---|---|---|---|"]
    for f in findings:
        message = f.message.replace("|", "/")
        lines.append(f"| {f.kind.replace('_', ' ')} | `{f.module}` | {f.where or '-'} | {_number(f.value)} | "
                     f"{_number(f.threshold)} | {message} |")
    return "\n".join(lines)


def console_line(finding: Finding, cleared_in: int | None = None) -> str:
    """One line for the console when a finding appears, or when it is gone in epoch ``cleared_in``."""
    where = f" {finding.where}" if finding.where else ""
    if cleared_in is not None:
        return (f"lightning_rnnviz: epoch {cleared_in}: {finding.kind} in {finding.module!r}{where} cleared "
                f"(it was there in epoch {finding.epoch}).")
    return (f"lightning_rnnviz: epoch {finding.epoch}: {finding.kind} in {finding.module!r}{where} "
            f"({_number(finding.value)} against {_number(finding.threshold)}): {finding.message}")
