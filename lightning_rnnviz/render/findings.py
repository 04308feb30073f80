"""Say what is wrong: rules with stated thresholds over one epoch's recordings of a module.

Each rule reads the epoch's means of statistics the callback computes anyway (no extra pass over the
records) and, when its condition holds, makes a :class:`Finding` that names the module, the layer and
direction (or head, or gate), and says in one sentence what it read (every number with its name and unit:
``gradient horizon 6.25 steps < threshold 12.8 steps``), what that means and what usually helps *for that
kind of module* (:func:`family`: a vanilla RNN is told to try a gated cell, an LSTM about its forget gate,
``nn.MultiheadAttention`` never to scale scores it scales already). The rules and their thresholds are
:data:`RULES`; docs/diagnosis.md lists them.

A condition is *reported* only once it persists (:class:`Persistence`): it must hold at
:data:`PERSIST_CHECKS` consecutive checks of its module (the ends of training epochs that had recordings
of it) that together hold at least :data:`PERSIST_RECORDINGS` recordings. A run whose epochs hold two or more
recordings of the module reports from its second epoch; a run with one recording per epoch (neuralforecast,
whose epochs are one batch each) from its fourth recording. ``nonfinite`` is reported at once
(:data:`AT_ONCE`); ``attention_uniform`` does not count a module's first check (:data:`NOT_AT_FIRST_CHECK`:
untrained queries and keys give every head nearly uniform weights). A finding clears at the first check where
its condition no longer holds. Conditions that hold but have not persisted yet are shown as such (the last
lines of the ``rnnviz/findings`` text, ``pending`` in ``summary.json``), never as findings.
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
    "exploding_gated": (2.0, ("for an LSTM or GRU (cells included), a hundredfold or more: the cell's additive path "
                              "carries the gradient back, and a curve rising about tenfold towards the early steps "
                              "a task marks is learning, not an explosion")),
    "gate_saturated": (0.5, "half or more of an LSTM forget gate's or GRU update gate's activations saturated at one end"),
    "hidden_saturated": (0.5, "half or more of the tanh-bounded states with |h| > 0.95"),
    "dead_unit_level": (1e-3, "a unit is dead when |h| stays below 1e-3 at every recorded step of the epoch"),
    "dead_units": (0.1, "10% or more of a layer's units dead"),
    "attention_collapse": (0.9, "a head's mean largest weight and the share of queries on their sample's most-attended key both 0.9 or more"),
    "attention_uniform": (0.95, "a head's `entropy_norm` at or above 0.95, not counting the module's first check"),
    "nonfinite": (0.0, "any NaN/Inf in a recording's states, gates, gradients or attention"),
}

#: A condition is reported once it has held at this many consecutive checks of its module ...
PERSIST_CHECKS = 2
#: ... holding together at least this many recordings of it.
PERSIST_RECORDINGS = 4
#: Rules reported at the first check where their condition holds: a NaN is never a phase of training.
AT_ONCE = frozenset({"nonfinite"})
#: Rules whose condition does not count at a module's first check: untrained query and key projections
#: give nearly equal scores, so every head starts out uniform.
NOT_AT_FIRST_CHECK = frozenset({"attention_uniform"})
#: Attention classes that scale their scores by 1/sqrt(d) before the softmax: ``nn.MultiheadAttention``,
#: and the temporal fusion transformers' (by default: pytorch-forecasting's and darts' scaled dot-product
#: modules divide by sqrt(d_k), neuralforecast's multiplies by d_head ** -0.5). The class names of
#: :data:`lightning_rnnviz.probe.known.KNOWN` (a test keeps them in step).
SCALED_ATTENTION = frozenset({"MultiheadAttention", "InterpretableMultiHeadAttention",
                              "_InterpretableMultiHeadAttention"})


def family(kind: str) -> str:
    """Which advice a module of ``kind`` gets: ``"vanilla"`` (``RNN_TANH``, ``RNNCell``), ``"relu"``
    (``RNN_RELU``), ``"lstm"`` (``LSTM``, ``LSTMCell``), ``"gru"`` (``GRU``, ``GRUCell``), ``"scaled"``
    (attention that scales its scores, :data:`SCALED_ATTENTION`) or ``"attention"`` (``custom`` and any
    other attention).

    Example::

        >>> [family(k) for k in ("RNN_TANH", "LSTMCell", "MultiheadAttention", "custom")]
        ['vanilla', 'lstm', 'scaled', 'attention']
    """
    if kind in ("LSTM", "LSTMCell"):
        return "lstm"
    if kind in ("GRU", "GRUCell"):
        return "gru"
    if kind == "RNN_RELU":
        return "relu"
    if kind in ("RNN_TANH", "RNNCell"):
        return "vanilla"
    if kind in SCALED_ATTENTION:
        return "scaled"
    return "attention"


_CLIP = "gradient clipping (`Trainer(gradient_clip_val=1.0)`)"
_SHORTER = "shorter (truncated) sequences"
_SKIP = "a skip connection or attention over the states"

# rule -> family -> what usually helps; "rnn" for every recurrent family without its own text. Texts hold
# no "|" inside a code span (the markdown escapes "|" as "\|") and no "*" (emphasis in markdown).
_ADVICE: dict[str, dict[str, str]] = {
    "vanishing_gradient": {
        "vanilla": f"a gated cell (`nn.LSTM`, `nn.GRU`), orthogonal recurrent weights, or {_SHORTER} usually help.",
        "relu": f"a gated cell (`nn.LSTM`, `nn.GRU`), recurrent weights initialised to the identity, or {_SHORTER} "
                "usually help.",
        "lstm": ("an LSTM carries the gradient back through its cell state only while its forget gate stays near 1: "
                 "a forget-gate bias of 1 or more (the second quarter of the biases: PyTorch orders the gates i, f, "
                 f"g, o), {_SHORTER}, or {_SKIP} usually help."),
        "gru": ("a GRU carries its state back only while its update gate z stays near 1 (PyTorch keeps h_(t-1) in "
                "proportion to z): an update-gate bias of 1 or more (the second third of the biases: PyTorch orders "
                f"the gates r, z, n), {_SHORTER}, or {_SKIP} usually help."),
    },
    "exploding_gradient": {
        "vanilla": f"the recurrent weights amplify it at every step; {_CLIP}, a lower learning rate, or orthogonal or "
                   "smaller recurrent weights usually help.",
        "relu": (f"a ReLU RNN's state has no bound, so recurrent weights that amplify compound at every step; {_CLIP}, "
                 "recurrent weights scaled below the identity, a lower learning rate, or `nonlinearity='tanh'` "
                 "usually help."),
        "rnn": f"rare in a gated cell; {_CLIP}, a lower learning rate, normalised inputs, or layer normalisation "
               "usually help.",
    },
    "hidden_saturated": {
        "lstm": ("the cell state is large while the output gate is open, so tanh of it is saturated and passes almost "
                 f"no gradient; normalised inputs, a lower learning rate, {_CLIP} or layer normalisation usually help."),
        "rnn": ("saturated units pass almost no gradient; normalised inputs, smaller input weights, a lower learning "
                f"rate, layer normalisation or {_CLIP} usually help."),
    },
    "dead_units": {
        "relu": ("typical of a ReLU RNN after a too large step: a unit whose input stays negative never recovers; a "
                 f"lower learning rate, {_CLIP}, `nonlinearity='tanh'`, or a different initialisation usually help."),
        "lstm": ("their output gate stays shut or their cell is never written (input gate shut); the gate means "
                 "(`rnnviz/gates`) show which; a lower learning rate or a different initialisation usually help."),
        "gru": ("their update gate stays near 1, so they keep their initial zero state; an update-gate bias nearer 0 "
                "or a lower learning rate usually help."),
        "rnn": ("their weights or inputs are (near) zero, or, in a ReLU cell, their input stays negative; a different "
                "initialisation, normalised inputs, or a lower learning rate usually help."),
    },
    "attention_collapse": {
        "scaled": ("every query looks at the same key, so the attention carries no information about the query; "
                   "checking the masks (one that leaves a single key open) and the positional information, a lower "
                   "learning rate, or attention dropout usually help."),
        "attention": ("every query looks at the same key, so the attention carries no information about the query; "
                      "scores that are dot products divided by sqrt(d) (unscaled ones saturate the softmax), checking "
                      "the masks and the positional information, a lower learning rate, or attention dropout usually "
                      "help."),
    },
    "attention_uniform": {
        "scaled": ("the head spreads its weight evenly over the keys. That is fine where the task needs an average over "
                   "them; otherwise (the module scales its scores by 1/sqrt(d) already, so scaling is not the cause) "
                   "more training, keys that differ from each other (positional information, normalised inputs), or "
                   "a higher learning rate usually help."),
        "attention": ("the head spreads its weight evenly over the keys. That is fine where the task needs an average "
                      "over them; otherwise the scores barely differ: more training, keys that differ from each other "
                      "(positional information, normalised inputs), or scores scaled down less (by 1/sqrt(d), not by "
                      "1/d or a high temperature) usually help."),
    },
    "nonfinite": {
        "any": ("training is diverging or an input holds NaN; a lower learning rate, gradient clipping, checking the "
                "data, or a GradScaler with fp16 usually help."),
    },
}

_GATE_HELP = {
    ("forget", "low"): "the cell forgets its state at almost every step, so little reaches back in time; a "
                       "forget-gate bias of 1 (or more) usually helps.",
    ("forget", "high"): "the cell keeps almost all of its state and seldom takes in new input; a lower learning "
                        "rate or a smaller forget-gate bias usually helps if the model does not learn.",
    ("update", "high"): "the state is copied through almost unchanged, so new input hardly enters; a lower "
                        "learning rate or normalised inputs usually help if the model does not learn.",
    ("update", "low"): "the state is replaced at almost every step, so little is remembered; initialising the "
                       "update-gate bias positive usually helps.",
}


def advice(rule: str, kind: str) -> str:
    """What usually helps against ``rule`` (one of :data:`KINDS` but ``gate_saturated``) in a module of
    ``kind``: the text of its :func:`family`, else the one every recurrent family shares (``"rnn"``).

    Example::

        >>> advice("vanishing_gradient", "RNN_TANH").startswith("a gated cell")
        True
        >>> "gated cell" in advice("vanishing_gradient", "LSTM")
        False
    """
    texts = _ADVICE[rule]
    group = family(kind)
    if group in texts:
        return texts[group]
    if group not in ("scaled", "attention") and "rnn" in texts:
        return texts["rnn"]
    if group == "scaled" and "attention" in texts:
        return texts["attention"]
    return texts.get("any") or next(iter(texts.values()))


@dataclass
class Finding:
    """One thing that looks wrong in one module during one epoch.

    Attributes:
        kind: one of :data:`KINDS`.
        module: the module's qualified name.
        epoch: the training epoch.
        value: the statistic that fired the rule.
        threshold: the rule's threshold for it.
        message: what was read (each number with its name and unit), what it means and what usually helps
            for this kind of module.
        layer, direction: where in a recurrent module (``direction`` ``"forward"``/``"reverse"`` for a
            bidirectional one); ``head`` in an attention module; ``gate`` for ``gate_saturated``.
        step: the step the epoch's summary was logged at.
        since: the epoch of the first of the consecutive checks at which the condition held (the finding is
            reported once it has persisted, see :class:`Persistence`).
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
    since: int | None = None

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
        module_kind: the kind of the recorded module, which chooses the advice (:func:`family`): for
            attention the record's kind (``"MultiheadAttention"``, ``"custom"``, or a library's class name such
            as ``"InterpretableMultiHeadAttention"``); ``""`` means ``kind``.
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
    module_kind: str = ""


def _at(values: Sequence[float] | None, row: int) -> float:
    if values is None or row >= len(values) or values[row] is None:
        return float("nan")
    return float(values[row])


def _n(value: float) -> str:
    """A number as the messages write it: three significant digits."""
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def check(module: str, summary: ModuleEpoch, epoch: int, step: int | None = None) -> list[Finding]:
    """Every rule of :data:`RULES` over one module's epoch: the conditions that hold at this check, in row
    order (whether each is reported yet is :class:`Persistence`'s to say).

    Example::

        >>> epoch = ModuleEpoch("RNN_TANH", ["layer 0"], stats={"horizon": [3.0], "decay_per_step": [-0.2],
        ...                     "log10_ratio": [-5.8]}, length=30.0, recordings=4)
        >>> [(f.kind, f.value, f.threshold) for f in check("rnn", epoch, epoch=2)]
        [('vanishing_gradient', 3.0, 15.0)]
        >>> check("rnn", epoch, epoch=2)[0].message[:45]
        'gradient horizon 3 steps < threshold 15 steps'
    """
    found: list[Finding] = []
    stats = summary.stats
    kind = summary.module_kind or summary.kind

    def add(rule: str, value: float, threshold: float, row: int | None, message: str, **where: Any) -> None:
        if summary.kind == "attention":
            where.setdefault("head", row)
        elif row is not None:
            layer, direction = divmod(row, summary.num_directions)
            where.setdefault("layer", layer)
            if summary.num_directions == 2:
                where.setdefault("direction", "reverse" if direction else "forward")
        found.append(Finding(rule, module, epoch, float(value), float(threshold), message, step=step, **where))

    if summary.nonfinite:
        add("nonfinite", summary.nonfinite, RULES["nonfinite"][0], None,
            f"{summary.nonfinite} of {summary.recordings} recordings with NaN/Inf (> threshold 0): "
            f"{advice('nonfinite', kind)}")
    for row in range(len(summary.rows)):
        if summary.kind == "attention":
            focus, same = _at(stats.get("focus"), row), _at(summary.same_key, row)
            limit = RULES["attention_collapse"][0]
            if focus >= limit and same >= limit:
                add("attention_collapse", same, limit, row,
                    f"{same:.0%} of the queries on their sample's most-attended key (>= threshold {limit:.0%}), "
                    f"mean largest weight (focus) {focus:.2f} >= threshold {limit:g}: "
                    f"{advice('attention_collapse', kind)}")
            entropy = _at(stats.get("entropy_norm"), row)
            limit = RULES["attention_uniform"][0]
            if entropy >= limit:
                add("attention_uniform", entropy, limit, row,
                    f"normalised entropy (entropy_norm) {entropy:.2f} >= threshold {limit:g} (1 = uniform over the "
                    f"allowed keys): {advice('attention_uniform', kind)}")
            continue
        decay, horizon = _at(stats.get("decay_per_step"), row), _at(stats.get("horizon"), row)
        reach = RULES["vanishing_horizon"][0] * summary.length
        if decay <= RULES["vanishing_decay"][0] and summary.length >= 4 and horizon < reach:
            gate = {"lstm": "forget", "gru": "update"}.get(family(kind))
            mean = _at(stats.get(f"{gate}_mean"), row) if gate else float("nan")
            gate_mean = f", {gate} gate mean {mean:.2f}" if math.isfinite(mean) else ""
            add("vanishing_gradient", horizon, reach, row,
                f"gradient horizon {_n(horizon)} steps < threshold {_n(reach)} steps (half the mean sequence "
                f"length of {_n(summary.length)} steps), decay_per_step {decay:+.3f} <= threshold "
                f"{RULES['vanishing_decay'][0]:+.2f} (log10 per step){gate_mean}: ||dL/dh_t|| falls below 1% of its "
                f"peak within the horizon back from the last step, so the module can hardly learn dependencies "
                f"longer than that; {advice('vanishing_gradient', kind)}")
        # the growth of the line fitted through the whole curve, not the ratio of its two end points: the
        # first step of a loss on every step gathers the gradients of all later steps, the last has only its own
        growth = decay * (summary.length - 1)
        limit = RULES["exploding_gated" if family(kind) in ("lstm", "gru") else "exploding"][0]
        if growth >= limit:
            add("exploding_gradient", growth, limit, row,
                f"growth of ||dL/dh_t|| back to the first step 10^{growth:.1f} (decay_per_step {decay:+.3f} over "
                f"{summary.length - 1:.0f} steps, a line fitted to the whole sequence) >= threshold 10^{limit:g}: "
                f"the gradient grows on its way back in time; {advice('exploding_gradient', kind)}")
        gate = {"LSTM": "forget", "LSTMCell": "forget", "GRU": "update", "GRUCell": "update"}.get(summary.kind)
        if gate is not None:
            limit = RULES["gate_saturated"][0]
            mean = _at(stats.get(f"{gate}_mean"), row)
            gate_mean = f", {gate} gate mean {mean:.2f}" if math.isfinite(mean) else ""
            for end in ("low", "high"):
                share = _at(stats.get(f"{gate}_saturated_{end}"), row)
                if share >= limit:
                    side = "below 0.1" if end == "low" else "above 0.9"
                    add("gate_saturated", share, limit, row,
                        f"{share:.0%} of the {gate} gate's activations {side} (>= threshold {limit:.0%}){gate_mean}: "
                        f"{_GATE_HELP[(gate, end)]}", gate=gate)
        saturated = _at(stats.get("saturated"), row)
        limit = RULES["hidden_saturated"][0]
        if saturated >= limit:
            add("hidden_saturated", saturated, limit, row,
                f"{saturated:.0%} of the states with |h| > 0.95 (>= threshold {limit:.0%}): "
                f"{advice('hidden_saturated', kind)}")
        dead = _at(summary.dead_fraction, row)
        limit = RULES["dead_units"][0]
        if dead >= limit:
            add("dead_units", dead, limit, row,
                f"{dead:.0%} of the layer's units dead, |h| below {RULES['dead_unit_level'][0]:g} at every recorded "
                f"step of the epoch (>= threshold {limit:.0%}): {advice('dead_units', kind)}")
    return found


class Persistence:
    """Which conditions have persisted: a condition that :func:`check` finds is reported once it has held at
    :data:`PERSIST_CHECKS` consecutive checks of its module holding together :data:`PERSIST_RECORDINGS` or more
    recordings (:data:`AT_ONCE` rules at once; :data:`NOT_AT_FIRST_CHECK` rules from the module's second check
    on). A check where it does not hold ends its run. What it remembers is saved with the callback
    (:meth:`state_dict`), so a resumed run goes on counting.

    Example::

        >>> rule = Persistence()
        >>> held = lambda epoch: [Finding("dead_units", "rnn", epoch, 0.5, 0.1, "...", layer=0)]
        >>> [len(rule.update("rnn", held(e), recordings=2, first=e == 0)[0]) for e in (0, 1, 2)]
        [0, 1, 1]
    """

    def __init__(self) -> None:
        # Finding.key -> [since epoch, checks, recordings] of the run of checks where it held
        self.runs: dict[tuple, list[int]] = {}

    def update(self, module: str, held: Sequence[Finding], recordings: int,
               first: bool) -> tuple[list[Finding], list[Finding]]:
        """One check of ``module``: the conditions ``held`` there, out of ``recordings`` recordings, at the
        module's ``first`` check or a later one. Returns the findings to report and those that hold but have
        not persisted yet; each with its ``since``."""
        counted = [f for f in held if not (first and f.kind in NOT_AT_FIRST_CHECK)]
        keys = {f.key for f in counted}
        for key in [k for k in self.runs if k[1] == module and k not in keys]:
            del self.runs[key]  # it no longer holds: a later one starts over
        reported: list[Finding] = []
        pending: list[Finding] = []
        for finding in counted:
            run = self.runs.setdefault(finding.key, [finding.epoch, 0, 0])
            run[1] += 1
            run[2] += int(recordings)
            finding.since = run[0]
            lasting = run[1] >= PERSIST_CHECKS and run[2] >= PERSIST_RECORDINGS
            (reported if lasting or finding.kind in AT_ONCE else pending).append(finding)
        return reported, pending

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"key": list(key), "since": run[0], "checks": run[1], "recordings": run[2]}
                for key, run in self.runs.items()]

    def load_state_dict(self, state: Iterable[Mapping[str, Any]]) -> None:
        self.runs = {tuple(entry["key"]): [int(entry["since"]), int(entry["checks"]), int(entry["recordings"])]
                     for entry in state}

    def assume_reported(self, findings: Iterable[Finding]) -> None:
        """Count ``findings`` as persisted (those of a checkpoint written before runs were saved)."""
        for f in findings:
            self.runs[f.key] = [f.since if f.since is not None else f.epoch, PERSIST_CHECKS, PERSIST_RECORDINGS]


def _cell(text: str) -> str:
    """``text`` for a markdown table cell or line: ``|`` escaped (TensorBoard's Text dashboard would read
    ``||dL/dh_t||`` as cell borders), line breaks as spaces."""
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").split())


def markdown(findings: Iterable[Finding], epoch: int, step: int | None = None,
             pending: Iterable[Finding] = ()) -> str:
    """A small markdown table of one epoch's findings, for TensorBoard's Text dashboard, then the conditions
    that hold but have not persisted long enough to be reported (``pending``). Every ``|`` of a message is
    escaped as ``\\|``, so ``||dL/dh_t||`` shows as written.

    Example::

        >>> f = Finding("vanishing_gradient", "rnn", 1, 3.0, 15.0, "||dL/dh_t|| falls", layer=0, since=0)
        >>> print(markdown([f], 1, 8))
        **Epoch 1** (step 8): 1 finding
        <BLANKLINE>
        | finding | module | where | since epoch | what it says |
        |---|---|---|---|---|
        | vanishing gradient | `rnn` | layer 0 | 0 | \\|\\|dL/dh_t\\|\\| falls |
    """
    findings, pending = list(findings), list(pending)
    head = f"**Epoch {epoch}**" + (f" (step {step})" if step is not None else "")
    if not findings:
        lines = [f"{head}: no findings. The rules and their thresholds are listed in docs/diagnosis.md."]
    else:
        lines = [f"{head}: {len(findings)} finding{'s' if len(findings) > 1 else ''}", "",
                 "| finding | module | where | since epoch | what it says |", "|---|---|---|---|---|"]
        for f in findings:
            since = f.epoch if f.since is None else f.since
            lines.append(f"| {f.kind.replace('_', ' ')} | `{f.module}` | {_cell(f.where) or '-'} | {since} | "
                         f"{_cell(f.message)} |")
    if pending:
        lines += ["", f"Not reported yet (a condition is reported once it holds at {PERSIST_CHECKS} consecutive "
                      f"epoch ends with {PERSIST_RECORDINGS} or more recordings in all):", ""]
        for f in pending:
            where = f" {_cell(f.where)}" if f.where else ""
            lines.append(f"- {f.kind.replace('_', ' ')} in `{f.module}`{where}, since epoch "
                         f"{f.epoch if f.since is None else f.since}: {_cell(f.message)}")
    return "\n".join(lines)


def console_line(finding: Finding, cleared_in: int | None = None) -> str:
    """One line for the console when a finding appears, or when it is gone in epoch ``cleared_in``."""
    where = f" {finding.where}" if finding.where else ""
    if cleared_in is not None:
        return (f"lightning_rnnviz: epoch {cleared_in}: {finding.kind} in {finding.module!r}{where} cleared "
                f"(it was there in epoch {finding.epoch}).")
    since = f" (held since epoch {finding.since})" if finding.since is not None and finding.since != finding.epoch else ""
    return f"lightning_rnnviz: epoch {finding.epoch}: {finding.kind} in {finding.module!r}{where}{since}: {finding.message}"
