"""What a recording becomes, for any logger and either Lightning namespace: pictures to draw, scalars and
histograms.

:class:`Reporter` is the Lightning-free core of the callbacks. It turns one :class:`~lightning_rnnviz.Recording`
into calls on an *output* (:meth:`picture`, :meth:`scalars`, :meth:`histogram`; see :class:`Output`), keeps
the per-epoch gradient curves behind the ``grad_decay`` picture, and runs each module's part of a recording
as a route of named stages (:class:`Stage`: its pictures, statistics, histograms, gradient curve and the
findings' statistics) through a :class:`Guard`, so that an error in a figure never reaches training: a failed
stage is warned once, counted, and skips that module's remaining stages for the recording. The callbacks
only decide when to record and which loggers the output writes to.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

import lightning_rnnviz.render as render
from lightning_rnnviz.names import PROBE_SET_TAG, safe_name
from lightning_rnnviz.probe.held import Location, Where
from lightning_rnnviz.probe.held import warn as held_warn
from lightning_rnnviz.probe.records import AttentionRecord, Recording, RNNRecord
from lightning_rnnviz.render import explore
from lightning_rnnviz.render import findings as findings_
from lightning_rnnviz.render.jobs import Job
from lightning_rnnviz.render.labels import Axes, token_axes

QUANTITIES = ("hidden", "gates", "grad_norm", "grad_decay", "attention")
SCALARS = ("default", "all")  # which statistics are written as scalars (every one is computed either way)
# the statistics written by default, per quantity (a gate's ``<gate>_mean`` besides)
DEFAULT_STATS = {
    "grad_norm": ("first_norm", "last_norm", "horizon", "log10_ratio"),
    "hidden": ("mean_abs",),
    "gates": (),
    "attention": ("entropy_norm",),
}


def default_scalar(quantity: str, stat: str) -> bool:
    """Whether statistic ``stat`` of ``quantity`` (its name as the statistics functions give it, with its row
    or head suffix) is written with ``scalars="default"``: the gradient's ``first_norm``, ``last_norm``,
    ``horizon`` and ``log10_ratio``, the hidden state's ``mean_abs``, each gate's ``<gate>_mean`` and
    attention's ``entropy_norm``. The rest (``decay_per_step``, ``saturated``, ``step_change``,
    ``<gate>_saturated_low/high``, ``entropy``, ``focus``, the ``exact`` flags) needs ``scalars="all"``.

    Example::

        >>> default_scalar("grad_norm", "horizon/layer1"), default_scalar("grad_norm", "decay_per_step")
        (True, False)
        >>> default_scalar("gates", "forget_mean"), default_scalar("gates", "forget_saturated_low")
        (True, False)
    """
    name = stat.split("/", 1)[0]
    if quantity == "gates":
        return name.endswith("_mean")
    return name in DEFAULT_STATS.get(quantity, ())


class Output(Protocol):
    """Where a :class:`Reporter` sends what it makes (the callbacks' fan-out over every logger)."""

    def picture(self, job: Job) -> None: ...

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def histogram(self, tag: str, buckets: Callable[[], Mapping[str, Any] | None], step: int) -> None: ...

    def text(self, tag: str, markdown: str, step: int) -> None: ...

    def document(self, name: str, data: Mapping[str, Any] | str, step: int) -> None:
        """A JSON document: a mapping, or its JSON text."""

    def probe_set(self, tag: str, blob: bytes, step: int) -> None: ...


class Stage(NamedTuple):
    """One named step of a module's route through a recording: ``work(*args)``. ``what`` names it where a
    failure is warned and counted (``error_counts``), e.g. ``"hidden statistics of 'lstm'"``."""

    what: str
    work: Callable[..., Any]
    args: tuple[Any, ...] = ()


class Guard:
    """Runs a callback's work by name: one step (:meth:`run`) or a module's stages in a recording
    (:meth:`stages`, where a failed stage skips the module's later ones). An error is warned once per name,
    counted in ``counts`` under that name and never reaches training; ``strict`` re-raises it instead (for
    tests).

    Args:
        owner: the name warnings start with, e.g. ``"RNNViz"``.
        strict: re-raise instead of warning.
        category: the warnings' class (the callbacks use :class:`~lightning_rnnviz.RNNVizWarning`).

    Attributes:
        locate: module name (``None``: the model) -> where a warning about it points, the user's class
            (:func:`lightning_rnnviz.probe.held.locator`); ``None`` (the default): where
            :func:`warnings.warn` would.
    """

    def __init__(self, owner: str, strict: bool = False, category: type[Warning] = UserWarning) -> None:
        self.owner = owner
        self.strict = strict
        self.category = category
        self.counts: Counter[str] = Counter()
        self.warned: set[str] = set()
        self.locate: Callable[[str | None], Location | None] | None = None

    def run(self, what: str, work: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``work(*args, **kwargs)``, named ``what`` ("flush", "draw hidden of 'lstm'"): its value, or ``None``
        when it failed (warned once per ``what`` and counted; raised with ``strict``)."""
        return self._attempt(what, work, args, kwargs)[1]

    __call__ = run  # the sinks' fan-out takes any ``guard(what, fn)``

    def stages(self, route: Iterable[Stage]) -> bool:
        """Run a module's stages in order until one fails: that one is warned (once per :attr:`Stage.what`)
        and counted, and the module's remaining stages are skipped for this recording (``strict`` raises).
        Whether every stage ran."""
        for stage in route:
            ran, _ = self._attempt(stage.what, stage.work, stage.args, {})
            if not ran:
                return False  # the later stages would work on what this one failed on
        return True

    def _attempt(self, what: str, work: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: Mapping[str, Any]) -> tuple[bool, Any]:
        try:
            return True, work(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the run must not die for a picture
            if self.strict:
                raise
            self.problem(what, error)
            return False, None

    def problem(self, what: str, error: BaseException | str) -> None:
        """Count a failure of ``what``; the first one is warned."""
        self.counts[what] += 1
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.once(what, f"{self.owner} could not {what} ({detail}); skipped, training goes on. Further errors "
                  "are counted in `error_counts`.")

    def once(self, key: str, message: str, module: str | None = None) -> bool:
        """Warn ``message`` unless a warning was given under ``key`` already; whether it was given now. It
        points at the user's class of ``module`` (``None``: the model's) where :attr:`locate` knows it."""
        if key in self.warned:
            return False
        self.warned.add(key)
        held_warn(message, self.category, stacklevel=4, where=self.where(module))
        return True

    def warn(self, message: str, module: str | None = None, stacklevel: int = 2) -> None:
        """Warn ``message`` (every time), pointing as :meth:`once` does."""
        held_warn(message, self.category, stacklevel=stacklevel + 1, where=self.where(module))

    def where(self, module: str | None = None) -> Where | None:
        """Where a warning about ``module`` points, worked out when it is given; ``None`` without :attr:`locate`."""
        locate = self.locate
        return None if locate is None else functools.partial(locate, module)


class Reporter:
    """Turns recordings into pictures, scalars and histograms for one monitor.

    Args:
        quantities: what to produce, a subset of :data:`QUANTITIES`.
        names: the modules this monitor shows (records of other modules are ignored).
        guard: runs each piece of work (see :class:`Guard`).
        sample: which sequence of the batch the figures draw.
        top_k: most units per layer in hidden-state heatmaps.
        max_heads: most attention heads drawn.
        max_time: most time columns drawn.
        renderer: ``"fast"`` or ``"matplotlib"``, carried by every :class:`~lightning_rnnviz.render.jobs.Job`.
        histograms: produce activation histograms.
        scalars: ``"default"`` writes the statistics of :func:`default_scalar`, ``"all"`` every one and the
            ``exact`` flags; the findings and ``summary.json`` use every statistic either way.
        probe_rows: the rows of the recorded batch whose probe set (the explorer's data,
            :func:`~lightning_rnnviz.render.explore.probe_set`) each recording writes; ``None``: none.
        probe_bytes: the bound on one probe set's size.
        probe_notes: what every probe set's ``notes`` say besides its own (e.g. that ``max_samples`` capped
            the rows).
    """

    def __init__(
        self,
        quantities: Iterable[str],
        names: Iterable[str],
        guard: Guard,
        *,
        sample: int = 0,
        top_k: int = 64,
        max_heads: int = 8,
        max_time: int = 256,
        renderer: str = "fast",
        histograms: bool = True,
        scalars: str = "default",
        probe_rows: Sequence[int] | None = None,
        probe_bytes: int = explore.MAX_BYTES,
        probe_notes: Sequence[str] = (),
    ) -> None:
        self.quantities = tuple(quantities)
        self.probe_rows = None if probe_rows is None else [int(r) for r in probe_rows]
        self.probe_bytes = probe_bytes
        self.probe_notes = list(probe_notes)
        self.scalars = scalars
        self.names = set(names)
        self.guard = guard
        self.sample, self.top_k, self.max_heads, self.max_time = sample, top_k, max_heads, max_time
        self.renderer = renderer
        self.histograms = histograms
        self.decay_history: dict[str, dict[int, torch.Tensor]] = {}
        self.layer_labels: dict[str, list[str]] = {}  # module -> "layer 0", "layer 0 reverse", ...
        self.findings: list[findings_.Finding] = []  # every epoch's, in order
        self.persistence = findings_.Persistence()  # how long each condition has held
        self.pending: list[findings_.Finding] = []  # the last check's conditions that have not persisted yet
        self.summary: dict[str, dict[str, Any]] = {}  # module -> {"kind", "rows", "epochs": {epoch: {...}}}
        self.notes: dict[str, list[str]] = {}  # module -> approximation notes of any recording so far
        self._to_draw: set[str] = set()  # modules whose grad_decay the next `draw_epoch` redraws
        self.context: dict[str, tuple[str, ...]] = {}  # module -> what its last record shows (calls, chaining)
        self.alignment: dict[str, str] = {}  # module -> how its gradient curves line sequences up
        self._epoch_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._epoch: dict[str, _Collected] = {}  # this epoch's statistics per module
        self._recordings = 0  # recordings reported so far (an index for the epoch's statistics)
        self._encoded: dict[tuple[str, int], tuple[dict[str, Any], str]] = {}  # see `summary_text`

    # --- one recording ---------------------------------------------------------------------------
    def report(
        self,
        recording: Recording,
        out: Output,
        step: int,
        *,
        prefix: str = "rnnviz",
        training: bool = True,
        tokens: Callable[[], Any] | None = None,
        probe_tokens: Callable[[], Mapping[int, Any]] | None = None,
        probe_modules: Collection[str] | None = None,
    ) -> None:
        """Everything one recording shows, sent to ``out``.

        Args:
            recording: the probe's recording of one batch.
            out: where pictures, scalars and histograms go.
            step: the step they are logged at.
            prefix: ``"rnnviz"`` for training, ``"rnnviz/val"`` for the validation sample.
            training: whether the batch was a training batch (statistics and gradients only then).
            tokens: ``labels(batch)``, called at most once, for the time axes
                (:func:`~lightning_rnnviz.render.labels.token_axes` puts them on each module's axes).
            probe_tokens: ``{row: what labels returned for that row}`` for the probe set's rows that have
                tokens (called at most once, only when :attr:`probe_rows` asks for a probe set).
            probe_modules: the modules the probe set shows (several monitors of one recording write one
                probe set, of all their modules); ``None``: this reporter's own; empty: none.
        """
        mine = {n: r for n, r in recording.items() if n in self.names}
        self._recordings += 1
        self.guard.run("draw the chosen `sample`", self._check_sample, mine)
        labels: dict[str, Axes] = {}
        if tokens is not None:
            labels = self.guard.run("use the `labels` tokens", self._token_axes, tokens, mine, recording) or {}
        self._warn_nonfinite(mine, step)
        for name, record in mine.items():
            part = _Part(name, record, out, step, prefix)
            if isinstance(record, RNNRecord):
                self._warn_approximate(name, record)
                self.layer_labels[name] = [record.layer_label(i) for i in range(record.hidden.shape[0])]
                self.guard.stages(self._rnn_route(part, record, training, labels.get(name)))
            elif isinstance(record, AttentionRecord) and "attention" in self.quantities:
                self._warn_approximate(name, record)
                self.guard.stages(self._attention_route(part, record, training, labels.get(name)))
        shown = mine if probe_modules is None else {n: r for n, r in recording.items() if n in probe_modules}
        if self.probe_rows is not None and shown:
            self.guard.stages([Stage("write the probe set", self._write_probe_set, (shown, recording, out, step,
                                                                                     training, probe_tokens))])

    def _write_probe_set(self, records: Mapping[str, Any], recording: Recording, out: Output, step: int,
                         training: bool, probe_tokens: Callable[[], Mapping[int, Any]] | None) -> None:
        """The explorer's data of this recording: the probe set of :attr:`probe_rows`, under
        ``rnnviz/probe_set/train`` or ``rnnviz/probe_set/val``."""
        rows = self.probe_rows
        tokens = module_tokens = None
        if probe_tokens is not None:
            given = self.guard.run("use the `labels` tokens for the probe set", probe_tokens) or {}
            axes = [self.guard.run("use the `labels` tokens for the probe set", _row_axes, given[row], records,
                                   row, recording) if given.get(row) is not None else None for row in rows]
            tokens = [_sequence_tokens(a, records) for a in axes]
            module_tokens = _module_tokens(axes, records)
        blob = explore.probe_set(records, rows, step, "training" if training else "validation", tokens,
                                 max_bytes=self.probe_bytes, notes=self.probe_notes, module_tokens=module_tokens)
        out.probe_set(f"{PROBE_SET_TAG}/{'train' if training else 'val'}", blob, step)

    def _token_axes(self, tokens: Callable[[], Any], records: Mapping[str, Any],
                    recording: Recording) -> dict[str, Axes]:
        return token_axes(tokens(), records, self.sample, recording)

    def _warn_nonfinite(self, records: Mapping[str, Any], step: int) -> None:
        """One warning per run when a recording holds NaN/Inf (the figures mark them at every step)."""
        if "nonfinite" in self.guard.warned:
            return
        for name, record in records.items():
            fields = ("hidden", "hidden_grad", "cell", "cell_grad") if isinstance(record, RNNRecord) else ("attention",)
            # A finite sum means finite values (one pass, no mask); only a non-finite sum needs the real check.
            bad = [f for f in fields if getattr(record, f) is not None and not bool(getattr(record, f).sum().isfinite())
                   and not bool(torch.isfinite(getattr(record, f)).all())]
            if bad:
                self.guard.once("nonfinite", f"{self.guard.owner}: NaN/Inf in {', '.join(bad)} of {name!r} at step "
                                f"{step}. Training goes on; the figures mark non-finite values (this warning is shown once).",
                                module=name)
                return

    def _check_sample(self, records: Mapping[str, Any]) -> None:
        for name, record in records.items():
            batch = record.batch if isinstance(record, RNNRecord) else record.attention.shape[0]
            if self.sample >= batch:
                raise ValueError(
                    f"`sample={self.sample}` is past the {batch} recorded sequences of {name!r}; the last one is "
                    f"drawn instead. Pick `sample` below {batch}."
                )

    def _collect(self, name: str, record: RNNRecord | AttentionRecord) -> _Collected:
        collected = self._epoch.get(name)
        if collected is None:
            collected = self._epoch[name] = _Collected(record)
        if getattr(record, "context", ()):
            self.context[name] = tuple(record.context)
        if not record.exact:
            collected.approximate(record.notes)
        return collected

    def _warn_approximate(self, name: str, record: RNNRecord | AttentionRecord) -> None:
        if not record.exact:
            notes = self.notes.setdefault(name, [])
            notes.extend(n for n in record.notes if n not in notes)
            note = " ".join(record.notes) or "the replay could not reproduce the training forward."
            self.guard.once(f"approximate {name}", f"{self.guard.owner}: the record of {name!r} is approximate: "
                            f"{note} Its figures and summary.json say so (and with `scalars=\"all\"` its statistics carry "
                            "`exact` = 0; this warning is shown once per module).", module=name)

    # --- a module's route through one recording: its stages, in order ------------------------------------
    def _rnn_route(self, part: _Part, record: RNNRecord, training: bool, tokens: Axes | None) -> list[Stage]:
        """An LSTM/GRU/RNN record's stages: per quantity its picture, statistics (training batches) and
        histograms, then this epoch's gradient curve and the findings' statistics."""
        sample = min(self.sample, record.batch - 1)
        gradients = training and record.hidden_grad is not None
        where = f"{part.prefix}/{{}}/{safe_name(part.name)}"
        route: list[Stage] = []
        if "hidden" in self.quantities:
            labels = tokens.time if tokens else None
            route.append(self._picture(part, "hidden", render.reduce_hidden, record, sample, self.top_k,
                                       self.max_time, labels))
            if training:
                route.append(self._statistics(part, "hidden", render.hidden_stats))
            route += self._histogram(part, where.format("hidden_dist"), record.hidden)
        if "gates" in self.quantities and record.gates:
            route.append(self._picture(part, "gates", render.reduce_gates, record, self.max_time))
            if training:
                route.append(self._statistics(part, "gates", render.gate_stats))
            for gate, values in record.gates.items():
                route += self._histogram(part, f"{where.format('gates_dist')}/{gate}", values)
        if gradients and "grad_norm" in self.quantities:
            route.append(self._picture(part, "grad_norm", render.reduce_grad_norm, record))
            route.append(self._statistics(part, "grad_norm", render.grad_stats))
        if gradients and "grad_decay" in self.quantities:
            route.append(Stage(f"collect the gradient curve of {part.name!r}", self._accumulate_decay,
                               (part.name, record)))
        if training:
            route.append(self._findings_statistics(part))
        return route

    def _attention_route(self, part: _Part, record: AttentionRecord, training: bool,
                         tokens: Axes | None) -> list[Stage]:
        """An attention record's stages: its picture, then (training batches) its statistics and the
        findings' statistics."""
        sample = min(self.sample, record.attention.shape[0] - 1)
        query_labels, key_labels = (tokens.query, tokens.key) if tokens else (None, None)
        # what the labels took it for, else what the call showed (self-attention crops padded queries too)
        self_attention = tokens.self_attention if tokens else record.query_is_key
        route = [self._picture(part, "attention", render.reduce_attention, record, sample, self.max_heads,
                               query_labels, key_labels, self.max_time, self_attention)]
        if training:
            route += [self._statistics(part, "attention", render.attention_stats), self._findings_statistics(part)]
        return route

    # the stages' names (the keys of `error_counts`) and their work
    def _picture(self, part: _Part, quantity: str, reduce: Callable[..., Any], *args: Any) -> Stage:
        """Reduce ``quantity`` on this thread (milliseconds), ``reduce(*args)``; the output draws and writes it."""
        return Stage(f"draw {quantity} of {part.name!r}", self._reduce_picture, (part, quantity, reduce, *args))

    def _statistics(self, part: _Part, quantity: str, compute: Callable[[Any], Mapping[str, float]]) -> Stage:
        return Stage(f"{quantity} statistics of {part.name!r}", self._write_statistics, (part, quantity, compute))

    def _histogram(self, part: _Part, tag: str, values: torch.Tensor) -> list[Stage]:
        """Buckets of the valid ``values``, counted only when some logger keeps histograms (``out`` asks)."""
        return [Stage(f"histogram {tag!r}", self._write_histogram, (part, tag, values))] if self.histograms else []

    def _findings_statistics(self, part: _Part) -> Stage:
        return Stage(f"collect the findings' statistics of {part.name!r}", self._collect_statistics, (part,))

    def _reduce_picture(self, part: _Part, quantity: str, reduce: Callable[..., Any], *args: Any) -> None:
        self._send_picture(part.out, quantity, reduce(*args), f"{part.prefix}/{quantity}/{safe_name(part.name)}",
                           part.step)

    def _send_picture(self, out: Output, quantity: str, payload: Any, tag: str, step: int) -> None:
        if payload is not None:
            out.picture(Job(quantity, payload, tag, step, self.renderer))

    def _write_statistics(self, part: _Part, quantity: str, compute: Callable[[Any], Mapping[str, float]]) -> None:
        """Statistics of one quantity, ``compute(record)``, every one kept for the findings and ``summary.json``;
        written are those :attr:`scalars` chooses (with ``"all"``, ``exact`` too: 1, or 0 for an approximate
        record)."""
        base = f"rnnviz/{quantity}/{safe_name(part.name)}"
        every = self.scalars == "all"
        stats = {k: float(v) for k, v in compute(part.record).items()}
        self._collect(part.name, part.record).add(self._recordings, stats)
        values = {f"{base}/{k}": v for k, v in stats.items() if every or default_scalar(quantity, k)}
        if every:
            values[f"{base}/exact"] = float(bool(part.record.exact))
        if values:
            part.out.scalars(values, part.step)

    def _write_histogram(self, part: _Part, tag: str, values: torch.Tensor) -> None:
        part.out.histogram(tag, functools.partial(_buckets, part.record, values), part.step)

    def _collect_statistics(self, part: _Part) -> None:
        collected = self._collect(part.name, part.record)
        if isinstance(part.record, RNNRecord):
            collected.rnn(self._recordings, part.record)
        else:
            collected.attention(self._recordings, part.record)

    # --- epochs ------------------------------------------------------------------------------------
    def _accumulate_decay(self, name: str, record: RNNRecord) -> None:
        norm = record.grad_norm  # (rows, T)
        # sequences of one length line up either way: they keep the module's alignment
        alignment = self.alignment.get(name, "start") if record.all_valid else record.grad_alignment
        self.alignment[name] = alignment
        if alignment == "end":  # the curve ends at the longest sequence's last step, and so do the sums
            norm = norm[:, : int(record.lengths.max())]
        finite = torch.isfinite(norm)
        values = torch.where(finite, norm, torch.zeros_like(norm)).double()
        total, count = self._epoch_sums.get(name, (values.new_zeros(0), values.new_zeros(0)))
        held = total.shape[-1] if total.numel() else 0
        steps = max(held, values.shape[-1])
        total = _pad_to(total, values.shape[0], steps)
        count = _pad_to(count, values.shape[0], steps)
        if alignment == "end":
            total, count = total.roll(steps - held, -1), count.roll(steps - held, -1)  # the padding in front
            total[:, steps - values.shape[-1]:] += values
            count[:, steps - values.shape[-1]:] += finite.double()
        else:
            total[:, : values.shape[-1]] += values
            count[:, : values.shape[-1]] += finite.double()
        self._epoch_sums[name] = (total, count)

    def end_epoch(self, epoch: int, step: int, out: Output) -> tuple[bool, list[str]]:
        """Close a training epoch (:meth:`close_epoch`), then draw its pictures (:meth:`draw_epoch`).

        Returns:
            Whether anything was drawn, and one console line per finding that appeared or cleared.
        """
        lines = self.close_epoch(epoch, step, out)
        return self.draw_epoch(step, out), lines

    def close_epoch(self, epoch: int, step: int, out: Output) -> list[str]:
        """The first part of an epoch's end, everything :meth:`state_dict` saves: store the epoch's mean
        gradient curves and statistics, check the findings' rules, write their table (``rnnviz/findings``)
        and the run's summary (``summary.json``).

        Returns:
            One console line per finding that appeared or cleared.
        """
        for name, (total, count) in self._epoch_sums.items():
            self.decay_history.setdefault(name, {})[epoch] = total / count
        self._to_draw |= set(self._epoch_sums)
        self._epoch_sums = {}
        collected, self._epoch = self._epoch, {}
        if not collected:
            return []
        return self.guard.run("check the findings", self._summarise, epoch, step, collected, out) or []

    def draw_epoch(self, step: int, out: Output) -> bool:
        """The second part of an epoch's end, which changes nothing :meth:`state_dict` saves: redraw
        ``grad_decay`` for every module the epochs closed since the last call added to (an epoch without a
        recording changes nothing). Returns whether anything was drawn."""
        decayed, self._to_draw = self._to_draw, set()
        drawn = False
        for name, history in self.decay_history.items():
            if name not in self.names or name not in decayed or "grad_decay" not in self.quantities:
                continue
            rows = next(iter(history.values())).shape[0]
            labels = self.layer_labels.get(name) or [f"row {i}" for i in range(rows)]
            epochs = self.summary.get(name, {}).get("epochs", {})
            horizons = {e: epochs[e]["horizon"] for e in history if e in epochs and epochs[e].get("horizon")}
            notes = tuple(self.notes.get(name, ()))
            payload = {"history": {e: h.numpy() for e, h in history.items()}, "name": name, "layer_labels": labels,
                       "horizons": horizons, "exact": not notes, "notes": notes,
                       "alignment": self.alignment.get(name, "start")}
            self.guard.run(f"draw grad_decay of {name!r}", self._send_picture, out, "grad_decay", payload,
                           f"rnnviz/grad_decay/{safe_name(name)}", step)
            drawn = True
        return drawn

    def _summarise(self, epoch: int, step: int, collected: Mapping[str, _Collected], out: Output) -> list[str]:
        previous = {f.key: f for f in self.findings if f.epoch == self._last_epoch()}
        found: list[findings_.Finding] = []
        pending: list[findings_.Finding] = []
        for name, data in sorted(collected.items()):
            summary = data.summary()
            first = not self.summary.get(name, {}).get("epochs")  # the module's first check
            entry = self.summary.setdefault(name, {"kind": summary.kind, "rows": summary.rows, "epochs": {}})
            record = {"step": step, "recordings": summary.recordings, "length": _json_number(summary.length)}
            if self.context.get(name):
                record["shown"] = list(self.context[name])
            if self.alignment.get(name) == "end":
                record["alignment"] = "end"  # its grad_norm curve counts back from the sequences' ends
            record["exact"] = data.exact  # false: some record of the epoch was approximate, its notes say why
            if not data.exact:
                record["notes"] = list(data.notes)
                # said where `summary` and `compare` print what a module's records showed
                record["shown"] = [*record.get("shown", []), f"an approximate record ({'; '.join(data.notes)})"]
            for stat in ("horizon", "decay_per_step", "log10_ratio", "entropy_norm", "entropy", "focus"):
                if stat in summary.stats:
                    record[stat] = [_json_number(v) for v in summary.stats[stat]]
            gates = {k.removesuffix("_mean"): [_json_number(v) for v in values]
                     for k, values in summary.stats.items() if k.endswith("_mean") and k != "mean_abs"}
            if gates:
                record["gate_means"] = gates
            curve = self.decay_history.get(name, {}).get(epoch)
            if curve is not None:
                record["grad_norm"] = [[_json_number(v) for v in row] for row in curve.tolist()]
            entry["epochs"][epoch] = record
            held = findings_.check(name, summary, epoch, step)
            reported, waiting = self.persistence.update(name, held, summary.recordings, first)
            found.extend(reported)
            pending.extend(waiting)
        self.findings.extend(found)
        # the modules checked now replace theirs; the others' stay as their last check left them
        self.pending = [f for f in self.pending if f.module not in collected] + pending
        now = {f.key: f for f in found}
        lines = [findings_.console_line(f) for key, f in now.items() if key not in previous]
        lines += [findings_.console_line(f, cleared_in=epoch) for key, f in previous.items()
                  if key not in now and f.module in collected]
        out.text("rnnviz/findings", findings_.markdown(found, epoch, step, pending), step)
        out.document("summary.json", self.summary_text(), step)
        return lines

    def _last_epoch(self) -> int | None:
        epochs = [e for entry in self.summary.values() for e in entry["epochs"]]
        return max(epochs) if epochs else None

    def summary_document(self) -> dict[str, Any]:
        """What ``summary.json`` holds (see docs/diagnosis.md)."""
        return {
            "format": "lightning_rnnviz.summary",
            "version": 1,
            "modules": {name: {"kind": entry["kind"], "rows": entry["rows"],
                               "epochs": {str(e): v for e, v in sorted(entry["epochs"].items())}}
                        for name, entry in sorted(self.summary.items())},
            "findings": [f.to_dict() for f in self.findings],
            "pending": [f.to_dict() for f in self.pending],
        }

    def summary_text(self) -> str:
        """:meth:`summary_document` as compact JSON, each epoch's record encoded once.

        ``summary.json`` is rewritten at every epoch end with a recording and grows with the epochs (each
        holds its gradient curve, rows x steps numbers): encoding all of it again each time took the
        recording worker 87 ms over the 21 such epoch ends of a 1000-step cpu-lstm run (about 4 ms each on
        average, growing with the run; 2026-12-07), holding the GIL the training thread needs. A record, once
        stored, is not changed: its text is kept with it, and a record replaced (a resume's
        :meth:`load_state_dict` may) is encoded afresh."""
        modules = []
        for name, entry in sorted(self.summary.items()):
            epochs = ",".join(f"{_compact(str(epoch))}:{self._record_text(name, epoch, record)}"
                              for epoch, record in sorted(entry["epochs"].items()))
            head = f'"kind":{_compact(entry["kind"])},"rows":{_compact(entry["rows"])}'
            modules.append(f'{_compact(name)}:{{{head},"epochs":{{{epochs}}}}}')
        findings = _compact([f.to_dict() for f in self.findings])
        pending = _compact([f.to_dict() for f in self.pending])
        return (f'{{"format":"lightning_rnnviz.summary","version":1,"modules":{{{",".join(modules)}}},'
                f'"findings":{findings},"pending":{pending}}}')

    def _record_text(self, name: str, epoch: int, record: dict[str, Any]) -> str:
        kept = self._encoded.get((name, epoch))
        if kept is None or kept[0] is not record:
            kept = self._encoded[(name, epoch)] = (record, _compact(record))
        return kept[1]

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay_history": {m: dict(h) for m, h in self.decay_history.items()},
            "findings": [f.to_dict() for f in self.findings],
            "persistence": self.persistence.state_dict(),
            "pending": [f.to_dict() for f in self.pending],
            "summary": {m: {**entry, "epochs": dict(entry["epochs"])} for m, entry in self.summary.items()},
            "notes": {m: list(n) for m, n in self.notes.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay_history = {m: dict(h) for m, h in state.get("decay_history", {}).items()}
        self.findings = [findings_.Finding.from_dict(f) for f in state.get("findings", [])]
        self.pending = [findings_.Finding.from_dict(f) for f in state.get("pending", [])]
        self.persistence = findings_.Persistence()
        if "persistence" in state:
            self.persistence.load_state_dict(state["persistence"])
        elif self.findings:  # saved before findings had to persist: the last epoch's stay reported
            last = max(f.epoch for f in self.findings)
            self.persistence.assume_reported(f for f in self.findings if f.epoch == last)
        self.summary = {m: {**entry, "epochs": {int(e): v for e, v in entry["epochs"].items()}}
                        for m, entry in state.get("summary", {}).items()}
        self.notes = {m: list(n) for m, n in state.get("notes", {}).items()}


@dataclasses.dataclass(frozen=True)
class _Part:
    """One module's record in one recording, and where what it shows goes (what its stages share)."""

    name: str
    record: RNNRecord | AttentionRecord
    out: Output
    step: int
    prefix: str


class _Collected:
    """One module's statistics over the recordings of the current epoch."""

    def __init__(self, record: RNNRecord | AttentionRecord) -> None:
        self.attention_kind = isinstance(record, AttentionRecord)
        self.module_kind = record.kind  # chooses the findings' advice
        if self.attention_kind:
            self.kind = "attention"
            self.rows = [f"head {h}" for h in range(record.heads)]
            self.suffixes = [f"/head{h}" for h in range(record.heads)]
            self.num_directions = 1
        else:
            self.kind = record.kind
            self.rows = [record.layer_label(i) for i in range(record.hidden.shape[0])]
            self.suffixes = [render.row_suffix(record, i) for i in range(record.hidden.shape[0])]
            self.num_directions = record.num_directions
        self.values: dict[str, list[list[float]]] = {}
        self.recordings: set[int] = set()
        self.nonfinite: set[int] = set()
        self.unit_peak: torch.Tensor | None = None
        self.same_key: list[np.ndarray] = []
        self.lengths: list[float] = []
        self.exact = True  # every record of the epoch was exact
        self.notes: list[str] = []  # the approximate records' notes

    def approximate(self, notes: Iterable[str]) -> None:
        """A record of the epoch was approximate, for the reasons ``notes`` give."""
        self.exact = False
        notes = list(notes) or ["the replay could not reproduce the training forward."]
        self.notes.extend(n for n in notes if n not in self.notes)

    def add(self, index: int, stats: Mapping[str, float]) -> None:
        """Recording ``index``'s statistics (``<stat><row suffix>`` -> value)."""
        self.recordings.add(index)
        for key, value in stats.items():
            for row, suffix in enumerate(self.suffixes):
                if (suffix and key.endswith(suffix)) or (not suffix and len(self.suffixes) == 1):
                    stat = key[: len(key) - len(suffix)] if suffix else key
                    rows = self.values.setdefault(stat, [[] for _ in self.suffixes])
                    rows[row].append(value)
                    break
            if not np.isfinite(value) and key.split("/")[0] in ("mean_abs", "first_norm", "last_norm", "entropy"):
                self.nonfinite.add(index)  # NaN/Inf in the states, gradients or weights

    def rnn(self, index: int, record: RNNRecord) -> None:
        """What the rules need beyond the statistics: each unit's largest ``|h|`` (dead units) and lengths."""
        self.recordings.add(index)
        # (rows, units); padding is 0; a NaN/Inf unit is not a dead one (the nonfinite rule covers it): NaN
        # reaches the unit's maximum and is read as Inf there
        peak = torch.nan_to_num(record.hidden.abs().amax(dim=(1, 2)), nan=torch.inf, posinf=torch.inf).cpu()
        self.unit_peak = peak if self.unit_peak is None else torch.maximum(self.unit_peak, peak)
        self.lengths.append(float(record.lengths.double().mean()) if record.lengths.numel() else float("nan"))
        norm = record.grad_norm
        if norm is not None and not bool(norm[:, : int(record.lengths.max())].isfinite().all()):
            self.nonfinite.add(index)

    def attention(self, index: int, record: AttentionRecord) -> None:
        """For heads that focus hard (``attention_collapse``): the share of queries on their sample's most
        attended key; computed only when some head's largest weights average 0.9 or more."""
        self.recordings.add(index)
        rows = self.values.get("focus")  # this recording's `focus` statistic, added just before
        focus = [values[-1] for values in rows if values] if rows else []
        if not any(f >= findings_.RULES["attention_collapse"][0] for f in focus):
            self.same_key.append(np.zeros(record.heads))
            return
        top = record.attention.float().argmax(-1)  # (B, H, Tq)
        mode = top.mode(-1).values  # (B, H)
        self.same_key.append((top == mode.unsqueeze(-1)).double().mean(-1).mean(0).cpu().numpy())

    def summary(self) -> findings_.ModuleEpoch:
        stats = {stat: [_nanmean(values) for values in rows] for stat, rows in self.values.items()}
        dead: list[float] = []
        if self.unit_peak is not None:
            level = findings_.RULES["dead_unit_level"][0]
            dead = (self.unit_peak < level).double().mean(-1).tolist()
        same = np.mean(self.same_key, axis=0).tolist() if self.same_key else []
        return findings_.ModuleEpoch(self.kind, self.rows, self.num_directions, stats, dead, same,
                                     _nanmean(self.lengths), len(self.recordings), len(self.nonfinite),
                                     self.module_kind)


def _compact(value: Any) -> str:
    """``value`` as compact JSON, as the sinks write a document (the json module's C encoder)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _json_number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def scalar_layout(kinds: Mapping[str, str], quantities: Iterable[str] = QUANTITIES, scalars: str = "default",
                  bidirectional: Iterable[str] = ()) -> dict[str, dict[str, list[str]]]:
    r"""Charts for TensorBoard's Custom Scalars dashboard: one category per module, one multi-line chart per
    family of statistics, plus one category comparing every module. Each title says what its lines are (one
    per layer, per gate and layer, per head, ...). Charts are ``{category: {title: [tag regex, ...]}}``.

    Args:
        kinds: module name -> ``"attention"`` or the recurrent module's type (``"LSTM"``, ``"GRUCell"``, ...).
        quantities: what the monitors log.
        scalars: ``"default"``: charts of the default statistics (see :func:`default_scalar`); ``"all"``:
            also of the others, the ``exact`` flags and the callback's ``rnnviz/overhead/*``.
        bidirectional: the modules with two directions (their lines are per layer and direction).

    Example::

        >>> charts = scalar_layout({"enc.rnn": "LSTM"}, ("grad_norm",))
        >>> charts["rnnviz: enc.rnn"]["gradient: log10(first / last norm), one line per layer"]
        ['rnnviz/grad_norm/enc\\.rnn/log10_ratio(/.*)?$']
        >>> sorted(scalar_layout({"enc.rnn": "LSTM"}, ("grad_norm",), "all"))
        ['rnnviz: enc.rnn', 'rnnviz: every module', 'rnnviz: overhead']
    """
    wanted = set(quantities)
    every_stat = scalars == "all"
    two = set(bidirectional)
    charts: dict[str, dict[str, list[str]]] = {}
    every: dict[str, list[str]] = {}
    for name, kind in sorted(kinds.items()):
        m = re.escape(safe_name(name))
        group: dict[str, list[str]] = {}
        if kind == "attention":
            if "attention" in wanted:
                group["attention: normalised entropy (1 = uniform), one line per head"] = [
                    f"rnnviz/attention/{m}/entropy_norm/.*"]
                if every_stat:
                    group["attention: entropy (nats), one line per head"] = [f"rnnviz/attention/{m}/entropy/.*"]
                    group["attention: largest weight of a query (focus), one line per head"] = [
                        f"rnnviz/attention/{m}/focus/.*"]
                every.setdefault("attention: normalised entropy, one line per module and head", []).append(
                    f"rnnviz/attention/{m}/entropy_norm/.*")
        else:
            rows = "layer and direction" if name in two else "layer"
            per_row = f"one line per {rows}"
            if "grad_norm" in wanted:
                group[f"gradient: ||dL/dh_t|| at the first and at the last step, two lines per {rows}"] = [
                    f"rnnviz/grad_norm/{m}/(first|last)_norm(/.*)?$"]
                group[f"gradient: horizon (steps back to 1 % of the peak norm), {per_row}"] = [
                    f"rnnviz/grad_norm/{m}/horizon(/.*)?$"]
                group[f"gradient: log10(first / last norm), {per_row}"] = [f"rnnviz/grad_norm/{m}/log10_ratio(/.*)?$"]
                if every_stat:
                    group[f"gradient: decay per step (log10), {per_row}"] = [
                        f"rnnviz/grad_norm/{m}/decay_per_step(/.*)?$"]
                every.setdefault(f"gradient: horizon (steps), one line per module and {rows}", []).append(
                    f"rnnviz/grad_norm/{m}/horizon(/.*)?$")
                every.setdefault(f"gradient: log10(first / last norm), one line per module and {rows}", []).append(
                    f"rnnviz/grad_norm/{m}/log10_ratio(/.*)?$")
            if "gates" in wanted and kind in ("LSTM", "GRU", "LSTMCell", "GRUCell"):
                group[f"gates: mean activation, one line per gate and {rows}"] = [
                    f"rnnviz/gates/{m}/[a-z]+_mean(/.*)?$"]
                if every_stat:
                    group[f"gates: fraction saturated low, one line per gate and {rows}"] = [
                        f"rnnviz/gates/{m}/[a-z]+_saturated_low(/.*)?$"]
                    group[f"gates: fraction saturated high, one line per gate and {rows}"] = [
                        f"rnnviz/gates/{m}/[a-z]+_saturated_high(/.*)?$"]
            if "hidden" in wanted:
                group[f"hidden: mean |h_t|, {per_row}"] = [f"rnnviz/hidden/{m}/mean_abs(/.*)?$"]
                if every_stat:
                    group[f"hidden: fraction of |h_t| > 0.95 (tanh-bounded states), {per_row}"] = [
                        f"rnnviz/hidden/{m}/saturated(/.*)?$"]
                    group[f"hidden: step change ||h_t - h_(t-1)||, {per_row}"] = [
                        f"rnnviz/hidden/{m}/step_change(/.*)?$"]
        if group and every_stat:
            group["record: exact (1) or approximate (0), one line per quantity"] = [f"rnnviz/[a-z_]+/{m}/exact$"]
        if group:
            charts[f"rnnviz: {name or 'root'}"] = group
    if every:
        charts["rnnviz: every module"] = every
    if every_stat and charts:
        charts["rnnviz: overhead"] = {
            "overhead: milliseconds of a recording, one line per part": ["rnnviz/overhead/.*_ms$"],
            "overhead: steps between recordings (every_n_steps) and figures dropped": [
                "rnnviz/overhead/(every_n_steps|dropped_figures)$"],
        }
    return charts


def valid_values(record: RNNRecord, values: torch.Tensor) -> torch.Tensor:
    """The entries of ``values`` ``(rows, batch, time, units)`` at valid steps, flattened, where they live."""
    if record.all_valid:
        return values.reshape(-1)  # no padding: a view, no copy
    return values[:, record.valid_mask()].flatten()


def _buckets(record: RNNRecord, values: torch.Tensor) -> dict[str, Any] | None:
    """:func:`histogram_buckets` of the valid steps of ``values``, a field of ``record``."""
    return histogram_buckets(valid_values(record, values))


def histogram_buckets(values: torch.Tensor, bins: int = 64) -> dict[str, Any] | None:
    """``bins`` equal buckets between the minimum and maximum of the finite ``values``, counted where the
    tensor lives (on the GPU for a record kept there): only the counts and five numbers cross to the host.
    The fields of :class:`lightning_rnnviz.sinks.Histogram` (the last bucket includes the maximum), or
    ``None`` when no value is finite.

    Example::

        >>> h = histogram_buckets(torch.tensor([0.0, 1.0, float("nan"), 1.0]), bins=2)
        >>> h["num"], h["counts"].tolist(), h["limits"].tolist()
        (3.0, [1.0, 2.0], [0.5, 1.0])
    """
    values = values.detach().reshape(-1).float()
    if not values.numel():
        return None
    # NaN and Inf reach the extremes: finite extremes mean finite values (one pass, one transfer)
    low, high = torch.stack(torch.aminmax(values)).tolist()
    if not (np.isfinite(low) and np.isfinite(high)):
        values = values[values.isfinite()]
        if not values.numel():
            return None
        low, high = torch.stack(torch.aminmax(values)).tolist()
    if high > low:
        # Bucket index by one multiply and a count; a value on an inner edge may land on either side of
        # it, as float32 rounding has it.
        index = torch.sub(values, low).mul_(bins / (high - low)).to(torch.int32).clamp_(max=bins - 1)
        counts = _bincount(index, bins)
        limits = np.linspace(low, high, bins + 1)[1:]
    else:
        counts, limits = torch.tensor([values.numel()]), np.array([high])
    sums = _sums(values, max(abs(low), abs(high))).tolist()
    return {
        "min": low,
        "max": high,
        "num": float(values.numel()),
        "sum": sums[0],
        "sum_squares": sums[1],
        "limits": np.asarray(limits, dtype=np.float64),
        "counts": counts.cpu().numpy().astype(np.float64),
    }


_CHUNK = 64  # values summed in float32 before their partial sums are added in float64


def _sums(values: torch.Tensor, largest: float) -> torch.Tensor:
    """``[sum, sum of squares]`` of the finite 1-D float32 ``values``: float32 sums of 64 consecutive
    values (or their norms), added up in float64. Good to float32 precision (within 1e-7 of the float64
    sums relative to the sum of magnitudes, often far closer) and ten times faster than a float64
    reduction, which converts every element on the way (14 ms for 4 million values here, against
    1.3 ms). TensorBoard shows neither number; they fill its histogram record. Values so large that 64
    squares could overflow float32 (beyond 1e18) are summed in float64 throughout."""
    if largest > 1e18:
        return torch.stack([values.sum(dtype=torch.float64),
                            torch.linalg.vector_norm(values, dtype=torch.float64).square()])
    whole = values.numel() - values.numel() % _CHUNK
    chunks, rest = values[:whole].view(-1, _CHUNK), values[whole:].double()
    return torch.stack([
        chunks.sum(1).double().sum() + rest.sum(),
        torch.linalg.vector_norm(chunks, dim=1).double().square().sum() + rest.square().sum(),
    ])


def _bincount(index: torch.Tensor, bins: int) -> torch.Tensor:
    """``torch.bincount``; under ``torch.use_deterministic_algorithms(True)`` on a device where PyTorch
    refuses it, the same counts from a sort."""
    try:
        return torch.bincount(index, minlength=bins)
    except RuntimeError:
        edges = torch.arange(bins + 1, device=index.device, dtype=index.dtype)
        return torch.searchsorted(index.sort().values, edges).diff()


def _pad_to(t: torch.Tensor, rows: int, steps: int) -> torch.Tensor:
    out = torch.zeros(rows, steps, dtype=torch.float64)
    if t.numel():
        out[:, : t.shape[-1]] = t
    return out


def _row_axes(value: Any, records: Mapping[str, Any], row: int, recording: Recording) -> dict[str, Axes] | None:
    """The tokens of batch row ``row`` per module, from what ``labels`` returned for it, by the pictures' rules
    (:func:`~lightning_rnnviz.render.labels.token_axes`); ``None`` for a row the recording does not hold."""
    if row >= min(r.batch if isinstance(r, RNNRecord) else r.attention.shape[0] for r in records.values()):
        return None  # not recorded: the probe set leaves the row out
    return token_axes(value, records, row, recording) or {}


def _sequence_tokens(axes: Mapping[str, Axes] | None, records: Mapping[str, Any]) -> list[str] | None:
    """A row's tokens on the probe set's time axis: those of the first recurrent module's time axis, else
    those of the first self-attention's keys; ``None`` when none fits."""
    if not axes:
        return None
    for name, record in records.items():
        if isinstance(record, RNNRecord) and name in axes and axes[name].time is not None:
            return list(axes[name].time)
    for name, record in records.items():
        if isinstance(record, AttentionRecord) and name in axes and axes[name].self_attention and axes[name].key:
            return list(axes[name].key)
    return None


def _module_tokens(axes: Sequence[Mapping[str, Axes] | None], records: Mapping[str, Any]
                   ) -> dict[str, dict[str, list[list[str] | None]]]:
    """Per module, each axis's tokens per row (``time`` for a recurrent module, ``query`` and ``key`` for an
    attention module), where any row has some: an encoder-decoder's decoder runs over the output tokens, a
    cross-attention's queries are output steps and its keys input steps, as in the pictures."""
    out: dict[str, dict[str, list[list[str] | None]]] = {}
    for name, record in records.items():
        fields = ("time",) if isinstance(record, RNNRecord) else ("query", "key")
        for field in fields:
            values = [None if not a or name not in a or getattr(a[name], field) is None
                      else list(getattr(a[name], field)) for a in axes]
            if any(v is not None for v in values):
                out.setdefault(name, {})[field] = values
    return out
