"""Runs compared after training, from the ``summary.json`` the callback writes at each training epoch's end.

What the command line (:mod:`lightning_rnnviz.cli`) prints and draws: a run's per-epoch statistics and
findings (:func:`summary_text`), and several runs' gradient norm curves ``||dL/dh_t||`` of a recurrent
module on one picture, or an attention module's ``entropy_norm`` and ``focus`` per head
(:func:`draw_compare`), with their statistics side by side (:func:`compare_table`). A run is a run folder
(the logger's ``log_dir``, or its ``rnnviz/`` folder) or a ``summary.json``, labelled by :func:`run_labels`.

In a notebook, the same in three lines::

    summaries = [read_summary(run) for run in ("logs/rnn/version_0", "logs/gru/version_0")]
    module, runs = select_runs(summaries)           # labels "rnn", "gru"; each run's last epoch
    draw_compare(runs, module).savefig("grads.svg")

``summary.json`` (version 1)::

    {"format": "lightning_rnnviz.summary", "version": 1,
     "modules": {"<module>": {"kind": "LSTM" | ... | "attention", "rows": ["layer 0", ...],
                              "epochs": {"<epoch>": {"step": int, "recordings": int,
                                                     "horizon": [per row], "decay_per_step": [per row],
                                                     "log10_ratio": [per row],
                                                     "grad_norm": [[per time step] per row],
                                                     "gate_means": {"<gate>": [per row]},
                                                     "entropy_norm": [per head], "entropy": [...],
                                                     "focus": [...]}}}},
     "findings": [{"kind": str, "module": str, "epoch": int, "layer": int | null,
                   "direction": "forward" | "reverse" | null, "head": int | null, "gate": str | null,
                   "value": float | null, "threshold": float | null, "message": str, "step": int | null}]}

Any statistic may be missing or null; null stands for NaN. Fields this version does not know are ignored.

Nothing here imports torch or Lightning; figures are :class:`matplotlib.figure.Figure` without pyplot.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from lightning_rnnviz.render import common
from lightning_rnnviz.render.findings import Finding  # the callback's own, read back
from lightning_rnnviz.render.gradients import NEAR_ZERO_LABEL, _above_resolution
from lightning_rnnviz.render.gradients import _log_limits as _resolved_limits

__all__ = [
    "ComparedRun",
    "EpochSummary",
    "Finding",
    "ModuleSummary",
    "Summary",
    "SummaryError",
    "compare_table",
    "draw_compare",
    "find_runs",
    "read_summaries",
    "read_summary",
    "run_labels",
    "save_figure",
    "select_runs",
    "summary_text",
]

FORMAT = "lightning_rnnviz.summary"
VERSION = 1
RNN_KINDS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "LSTMCell", "GRUCell", "RNNCell")
OUTPUT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
PNG_DPI = 150
ROW_STATS = ("horizon", "decay_per_step", "log10_ratio")
HEAD_STATS = ("entropy_norm", "entropy", "focus")
_HEADERS = {"horizon": "horizon", "decay_per_step": "decay/step", "log10_ratio": "log10 ratio",
            "entropy_norm": "entropy_norm", "entropy": "entropy", "focus": "focus"}
_FORMATS = {"horizon": "{:.1f}", "decay_per_step": "{:+.3f}", "log10_ratio": "{:+.2f}",
            "entropy_norm": "{:.3f}", "entropy": "{:.3f}", "focus": "{:.3f}"}
_NEEDS = ("it is written at each training epoch's end by the `RNNViz` callback of lightning_rnnviz 0.1 or "
          "later, into the logger's folder (e.g. `<log_dir>/rnnviz/summary.json`)")


class SummaryError(ValueError):
    """A run or ``summary.json`` that cannot be read; the message says which and why, on one line."""


# --- the summary as data ----------------------------------------------------------------------------------
@dataclass
class EpochSummary:
    """One epoch of one module. Per-row lists hold NaN where the file has null; ``None``: not in the file.

    Attributes:
        grad_norm: ``(rows, time)`` mean ``||dL/dh_t||`` per time step (shorter rows padded with NaN).
        gate_means: gate name -> per-row mean activation.
    """

    epoch: int
    step: int | None = None
    recordings: int | None = None
    length: float | None = None
    horizon: list[float] | None = None
    decay_per_step: list[float] | None = None
    log10_ratio: list[float] | None = None
    grad_norm: np.ndarray | None = None
    gate_means: dict[str, list[float]] = field(default_factory=dict)
    entropy_norm: list[float] | None = None
    entropy: list[float] | None = None
    focus: list[float] | None = None
    # what the module's records showed: which calls ("call 2 of 2", "calls 1-2 of 2 as one sequence ...")
    shown: list[str] = field(default_factory=list)
    # how `grad_norm` lines the sequences up: "start" (step t of each) or "end" (counted back from each end)
    alignment: str = "start"

    @property
    def has_head_stats(self) -> bool:
        """Whether an attention module's statistics (``entropy_norm``, ``entropy``, ``focus``) are here."""
        return any(getattr(self, stat) is not None for stat in HEAD_STATS)

    def stat(self, name: str, row: int) -> float | None:
        """Statistic ``name`` (a field, or a gate of :attr:`gate_means`) of ``row``; ``None`` if absent."""
        values = self.gate_means.get(name) if name in self.gate_means else getattr(self, name, None)
        if values is None or row >= len(values):
            return None
        return values[row]


@dataclass
class ModuleSummary:
    """One module of a run: its kind, row labels (layers and directions, or heads) and epochs."""

    name: str
    kind: str
    rows: list[str]
    epochs: dict[int, EpochSummary]

    @property
    def is_attention(self) -> bool:
        return self.kind == "attention"

    def last_epoch(self, with_curve: bool = False) -> int | None:
        """The last epoch (with ``with_curve``, the last that has a gradient curve, or of an attention
        module its statistics per head, if any has)."""
        epochs = sorted(self.epochs)
        if with_curve:
            curved = [e for e in epochs if self.has_data(e)]
            epochs = curved or epochs
        return epochs[-1] if epochs else None

    def has_data(self, epoch: int) -> bool:
        """Whether ``epoch`` has what ``compare`` draws: a gradient curve, or an attention module's
        statistics per head."""
        stats = self.epochs.get(epoch)
        if stats is None:
            return False
        if self.is_attention:
            return stats.has_head_stats
        return stats.grad_norm is not None and stats.grad_norm.size > 0

    def row_index(self, layer: int | None, direction: str | None) -> int | None:
        """The row of a finding's ``layer`` and ``direction``."""
        if layer is None:
            return None
        directions = 2 if any(r.endswith(("reverse", "forward")) for r in self.rows) else 1
        return layer * directions + (1 if direction == "reverse" and directions == 2 else 0)


@dataclass
class Summary:
    """A run's ``summary.json``.

    Attributes:
        path: the file.
        run_dir: the run's folder (the file's folder, or the one above ``rnnviz/``).
        modules: module name -> its summary.
        findings: every epoch's findings, in the file's order.
    """

    path: Path
    run_dir: Path
    modules: dict[str, ModuleSummary]
    findings: list[Finding]
    version: int = VERSION

    def module(self, name: str) -> ModuleSummary:
        """The module ``name``.

        Raises:
            SummaryError: no such module; the message lists those there are.
        """
        if name not in self.modules:
            raise SummaryError(f"{self.path}: has no module {name!r}; it has {_listing(self.modules)}.")
        return self.modules[name]


# --- reading ----------------------------------------------------------------------------------------------
def find_runs(path: str | os.PathLike[str]) -> list[Path]:
    """The ``summary.json`` files that ``path`` stands for: the file itself; ``<path>/summary.json``;
    ``<path>/rnnviz/summary.json``; else every ``**/rnnviz/summary.json`` below ``path`` (sorted).

    Raises:
        SummaryError: ``path`` does not exist, or no summary is found (the message says where it looked).
    """
    path = Path(path)
    if not path.exists():
        raise SummaryError(f"{path}: no such file or folder.")
    if path.is_file():
        return [path]
    for candidate in (path / "summary.json", path / "rnnviz" / "summary.json"):
        if candidate.is_file():
            return [candidate]
    found = sorted(p for p in path.glob("**/rnnviz/summary.json") if p.is_file())
    if not found:
        raise SummaryError(
            f"{path}: is not a lightning_rnnviz run: no summary.json, rnnviz/summary.json or "
            f"**/rnnviz/summary.json in it; {_NEEDS}."
        )
    return found


def read_summary(path: str | os.PathLike[str]) -> Summary:
    """Read one run's ``summary.json``.

    Args:
        path: the file, or a run folder (``<path>/summary.json``, ``<path>/rnnviz/summary.json``, or the
            only ``**/rnnviz/summary.json`` below it).

    Raises:
        SummaryError: the path does not exist or is not a run, holds several runs (they are listed), or
            the file is not a summary, is damaged, or comes from a newer version.
    """
    found = find_runs(path)
    if len(found) > 1:
        listing = ", ".join(str(p.parent.parent) for p in found)
        raise SummaryError(f"{path}: holds {len(found)} runs; pass one of them: {listing}.")
    return _parse(found[0])


def read_summaries(paths: Iterable[str | os.PathLike[str]]) -> list[Summary]:
    """Every run each of ``paths`` stands for (see :func:`find_runs`: a folder that holds several runs
    stands for all of them), each once, in order.

    Raises:
        SummaryError: as :func:`find_runs` and :func:`read_summary`.
    """
    files = [file for path in paths for file in find_runs(path)]
    return [_parse(file) for file in dict.fromkeys(files)]


def _parse(path: Path) -> Summary:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SummaryError(f"{path}: is not a text file, so not a lightning_rnnviz summary.") from None
    except OSError as error:
        raise SummaryError(f"{path}: cannot be read ({error.strerror or error}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SummaryError(
            f"{path}: is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            f"a damaged or truncated summary."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SummaryError(f"{path}: is JSON but not a lightning_rnnviz summary (no \"format\": {FORMAT!r}).")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SummaryError(f"{path}: has an invalid summary version {version!r}; a damaged summary.")
    if version > VERSION:
        raise SummaryError(f"{path}: was written by a newer lightning_rnnviz (summary version {version}; "
                           f"this one reads version {VERSION}); upgrade lightning_rnnviz to read it.")
    check = _Checker(path)
    modules = {}
    for name, entry in check.mapping(data.get("modules"), "modules").items():
        modules[name] = _module(check, name, entry)
    findings = [_finding(check, f, i) for i, f in enumerate(check.sequence(data.get("findings"), "findings"))]
    run_dir = path.parent.parent if path.parent.name == "rnnviz" else path.parent
    return Summary(path, run_dir, modules, findings, version)


class _Checker:
    """Type checks of the JSON, each failure a :class:`SummaryError` naming the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> SummaryError:
        return SummaryError(f"{self.path}: `{where}` {what}; a damaged summary.")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"is {type(value).__name__}, not an object")
        return value

    def sequence(self, value: Any, where: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"is {type(value).__name__}, not a list")
        return value

    def number(self, value: Any, where: str) -> float:
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"is {value!r}, not a number or null")
        return float(value)

    def integer(self, value: Any, where: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"is {value!r}, not an integer")
        return value

    def text(self, value: Any, where: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(where, f"is {value!r}, not a string")
        return value

    def numbers(self, value: Any, where: str) -> list[float] | None:
        if value is None:
            return None
        return [self.number(v, f"{where}[{i}]") for i, v in enumerate(self.sequence(value, where))]


def _module(check: _Checker, name: str, entry: Any) -> ModuleSummary:
    where = f"modules.{name}"
    entry = check.mapping(entry, where)
    kind = check.text(entry.get("kind"), f"{where}.kind") or "unknown"
    rows = [check.text(r, f"{where}.rows[{i}]") or f"row {i}"
            for i, r in enumerate(check.sequence(entry.get("rows"), f"{where}.rows"))]
    epochs = {}
    for key, value in check.mapping(entry.get("epochs"), f"{where}.epochs").items():
        if not re.fullmatch(r"\d+", key):
            raise check.fail(f"{where}.epochs", f"has the key {key!r}, not an epoch number")
        epochs[int(key)] = _epoch(check, int(key), value, f"{where}.epochs.{key}")
    return ModuleSummary(name, kind, rows, dict(sorted(epochs.items())))


def _epoch(check: _Checker, epoch: int, entry: Any, where: str) -> EpochSummary:
    entry = check.mapping(entry, where)
    result = EpochSummary(
        epoch,
        step=check.integer(entry.get("step"), f"{where}.step"),
        recordings=check.integer(entry.get("recordings"), f"{where}.recordings"),
    )
    if entry.get("length") is not None:
        result.length = check.number(entry["length"], f"{where}.length")
    for i, text in enumerate(check.sequence(entry.get("shown", []), f"{where}.shown")):
        result.shown.append(check.text(text, f"{where}.shown[{i}]") or "")
    alignment = check.text(entry.get("alignment"), f"{where}.alignment") or "start"
    if alignment not in ("start", "end"):
        raise check.fail(f"{where}.alignment", f"is {alignment!r}, not 'start' or 'end'")
    result.alignment = alignment
    for stat in ROW_STATS + HEAD_STATS:
        setattr(result, stat, check.numbers(entry.get(stat), f"{where}.{stat}"))
    for gate, values in check.mapping(entry.get("gate_means"), f"{where}.gate_means").items():
        result.gate_means[gate] = check.numbers(values, f"{where}.gate_means.{gate}") or []
    curves = entry.get("grad_norm")
    if curves is not None:
        rows = [check.numbers(row, f"{where}.grad_norm[{i}]") or []
                for i, row in enumerate(check.sequence(curves, f"{where}.grad_norm"))]
        length = max((len(r) for r in rows), default=0)
        result.grad_norm = np.full((len(rows), length), np.nan)
        for i, row in enumerate(rows):
            result.grad_norm[i, : len(row)] = row
    return result


def _finding(check: _Checker, entry: Any, index: int) -> Finding:
    where = f"findings[{index}]"
    entry = check.mapping(entry, where)
    return Finding(
        kind=check.text(entry.get("kind"), f"{where}.kind") or "unknown",
        module=check.text(entry.get("module"), f"{where}.module") or "",
        epoch=check.integer(entry.get("epoch"), f"{where}.epoch"),
        value=check.number(entry.get("value"), f"{where}.value"),
        threshold=check.number(entry.get("threshold"), f"{where}.threshold"),
        message=check.text(entry.get("message"), f"{where}.message") or "",
        layer=check.integer(entry.get("layer"), f"{where}.layer"),
        direction=check.text(entry.get("direction"), f"{where}.direction"),
        head=check.integer(entry.get("head"), f"{where}.head"),
        gate=check.text(entry.get("gate"), f"{where}.gate"),
        step=check.integer(entry.get("step"), f"{where}.step"),
    )


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(repr(n) for n in names) if names else "none"


# --- labels and tables ------------------------------------------------------------------------------------
_VERSION_DIR = re.compile(r"version_\d+")
# folders every run has, which tell runs apart less than the folders above them: Lightning's default logger
# folder (`Trainer(default_root_dir=X)` logs to X/lightning_logs/version_<n>), the callback's own folder
_GENERIC_DIR = re.compile(r"lightning_logs|rnnviz")
_WANDB_RUN_DIR = re.compile(r"(offline-)?run-\d{8}_\d{6}-\w+")  # W&B keeps a run's files in <run>/files


def run_labels(run_dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Short labels that tell runs apart: the fewest last parts of each run's folder that differ between
    the runs, leaving out a trailing Lightning ``version_<n>`` where the rest still tells them apart, and
    parts every run has (``lightning_logs``, ``rnnviz``, a W&B run's ``files``) where a more telling part
    is left: a run of ``Trainer(default_root_dir="exp_a")`` is ``exp_a``, not ``lightning_logs``.

    Example::

        >>> run_labels(["logs/rnn/version_0", "logs/gru/version_0", "logs/lstm/version_0"])
        ['rnn', 'gru', 'lstm']
        >>> run_labels(["logs/lstm/version_0", "logs/lstm/version_1"])
        ['version_0', 'version_1']
        >>> run_labels(["logs/lstm/version_3"])
        ['lstm']
        >>> run_labels(["exp_a/lightning_logs/version_0", "exp_b/lightning_logs/version_0"])
        ['exp_a', 'exp_b']
    """
    full = [_telling_parts(p) for p in run_dirs]
    short = [parts[:-1] if len(parts) > 1 and _VERSION_DIR.fullmatch(parts[-1]) else parts for parts in full]
    for candidate in (short, full):
        for k in range(1, max((len(c) for c in candidate), default=0) + 1):
            labels = ["/".join(c[-k:]) for c in candidate]
            if len(set(labels)) == len(labels):
                return labels
    labels = ["/".join(c[-1:]) for c in short]  # the same run more than once
    counts: dict[str, int] = {}
    for i, label in enumerate(labels):
        counts[label] = counts.get(label, 0) + 1
        if counts[label] > 1:
            labels[i] = f"{label} #{counts[label]}"
    return labels


def _telling_parts(run_dir: str | os.PathLike[str]) -> tuple[str, ...]:
    """The parts of ``run_dir``'s absolute path below its root, less the generic ones (kept where only
    generic parts and ``version_<n>`` would be left)."""
    path = Path(os.path.abspath(run_dir))
    parts = path.parts[1:] if path.anchor else path.parts
    kept = tuple(part for i, part in enumerate(parts)
                 if not (_GENERIC_DIR.fullmatch(part)
                         or part == "files" and i > 0 and _WANDB_RUN_DIR.fullmatch(parts[i - 1])))
    if all(_VERSION_DIR.fullmatch(part) for part in kept):  # nothing more telling: keep what there is
        kept = parts
    return kept or path.parts


def _format(value: float | None, pattern: str = "{:.3g}") -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return pattern.format(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Iterable[int] = (),
           indent: str = "  ") -> list[str]:
    """Aligned columns: numbers to the right, the columns in ``left`` to the left (the last one unpadded)."""
    left = set(left)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            last = i == len(cells) - 1
            if i in left:
                out.append(cell if last else cell.ljust(widths[i]))
            else:
                out.append(cell.rjust(widths[i]))
        return (indent + "  ".join(out)).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def _module_columns(module: ModuleSummary) -> list[str]:
    """The statistics of ``module`` that some epoch has, in reading order."""
    present = []
    for stat in ROW_STATS:
        if any(getattr(e, stat) is not None for e in module.epochs.values()):
            present.append(stat)
    gates: list[str] = []
    for e in module.epochs.values():
        gates.extend(g for g in e.gate_means if g not in gates)
    present.extend(gates)
    for stat in HEAD_STATS:
        if any(getattr(e, stat) is not None for e in module.epochs.values()):
            present.append(stat)
    return present


def summary_text(summary: Summary, module: str | None = None, label: str | None = None) -> str:
    """The ``summary`` command's report: per module a table of epochs and rows, then the findings.

    Raises:
        SummaryError: ``module`` is not in the run.
    """
    names = [summary.module(module).name] if module is not None else sorted(summary.modules)
    title = label or run_labels([summary.run_dir])[0]
    lines = [f"run {title}: {summary.path}"]
    if not names:
        lines += ["", "  no modules recorded yet"]
    for name in names:
        entry = summary.modules[name]
        noun = "head" if entry.is_attention else "row"
        count = len(entry.rows)
        lines += ["", f"{name} ({entry.kind}; {count} {noun}{'' if count == 1 else 's'})"]
        said = [entry.epochs[e].shown for e in sorted(entry.epochs) if entry.epochs[e].shown]
        for remark in said[-1] if said else ():  # as its last recording with something to say
            lines.append(f"  shows {remark}")
        columns = _module_columns(entry)
        lengths = any(e.length is not None for e in entry.epochs.values())  # the horizon's yardstick
        headers = ["epoch", "step"] + ["length"] * lengths + [noun]
        headers += [_HEADERS.get(c, f"{c} mean") for c in columns]
        rows = []
        for epoch, stats in entry.epochs.items():
            for r, row_label in enumerate(entry.rows or ["-"]):
                cells = [str(epoch), _format(stats.step, "{}")] + [_format(stats.length, "{:.1f}")] * lengths
                cells.append(row_label)
                cells += [_format(stats.stat(c, r), _FORMATS.get(c, "{:.3f}")) for c in columns]
                rows.append(cells)
        if rows:
            lines += _table(headers, rows, left=[headers.index(noun)])
            if any(c in columns for c in ROW_STATS):
                lines.append("  (horizon in steps; decay/step and log10 ratio in decades of ||dL/dh_t||"
                             + ("; length: mean valid sequence length" if lengths else "") + ")")
        else:
            lines.append("  no epochs summarised yet")
    findings = [f for f in summary.findings if module is None or f.module == module]
    lines += ["", f"findings ({len(findings)})" if findings else "findings: none"]
    if findings:
        table = [[_format(f.epoch, "{}"), f.kind, f.module, f.where or "-",
                  _format(f.value, "{:.3g}"), _format(f.threshold, "{:.3g}"), f.message] for f in findings]
        lines += _table(["epoch", "kind", "module", "where", "value", "threshold", "message"], table,
                        left=[1, 2, 3, 6])
    return "\n".join(lines) + "\n"


# --- comparing runs ---------------------------------------------------------------------------------------
@dataclass
class ComparedRun:
    """One run's side of a comparison: its label, summary, the compared module and the chosen epoch."""

    label: str
    summary: Summary
    module: ModuleSummary
    epoch: int
    stats: EpochSummary


def _choose_module(summaries: Sequence[Summary], labels: Sequence[str], module: str | None) -> str:
    if module is not None:
        for summary, label in zip(summaries, labels):
            if module not in summary.modules:
                raise SummaryError(f"run {label!r} ({summary.path}) has no module {module!r}; "
                                   f"it has {_listing(summary.modules)}.")
        return module
    recurrent = set.intersection(*({n for n, m in s.modules.items() if not m.is_attention}
                                   for s in summaries))
    attention = set.intersection(*({n for n, m in s.modules.items() if m.is_attention} for s in summaries))
    if len(recurrent) == 1:
        return next(iter(recurrent))
    if not recurrent and len(attention) == 1:
        return next(iter(attention))
    each = "; ".join(f"{label}: {_listing(s.modules)}" for s, label in zip(summaries, labels))
    if len(recurrent) > 1:
        why = "several recurrent modules are common to"
    elif attention:
        why = "no recurrent module and several attention modules are common to"
    else:
        why = "no recurrent or attention module is common to"
    raise SummaryError(f"{why} all runs; pick one with `--module NAME` (modules of each run: {each}).")


def _check_kinds(summaries: Sequence[Summary], labels: Sequence[str], name: str) -> None:
    """One kind of module to compare: an attention module in one run and a recurrent one in another is not."""
    kinds = {label: s.modules[name] for s, label in zip(summaries, labels)}
    attention = [label for label, m in kinds.items() if m.is_attention]
    recurrent = [f"{label} ({m.kind})" for label, m in kinds.items() if not m.is_attention]
    if attention and recurrent:
        raise SummaryError(
            f"module {name!r} is an attention module in run{'s' * (len(attention) > 1)} "
            f"{', '.join(repr(a) for a in attention)} and a recurrent module in "
            f"run{'s' * (len(recurrent) > 1)} {', '.join(recurrent)}; `compare` compares one kind at a "
            f"time: pass runs whose {name!r} is the same kind, or pick another module with `--module NAME`.")


def select_runs(summaries: Sequence[Summary], labels: Sequence[str] | None = None, module: str | None = None,
                epoch: int | str = "last", row: int | None = None) -> tuple[str, list[ComparedRun]]:
    """Choose what ``compare`` compares: the module (``None``: the only recurrent module all runs have,
    else the only attention module), each run's epoch (``"last"``: its last epoch with a gradient curve,
    or with an attention module's statistics) and check ``row`` (a head of an attention module).

    Args:
        summaries: the runs, as :func:`read_summary` returns them.
        labels: one per run (default: :func:`run_labels` of their folders).

    Returns:
        The module's name and one :class:`ComparedRun` per run.

    Raises:
        SummaryError: no such module, epoch or row, no common module to choose, a module recurrent in one
            run and attention in another, or nothing to draw (no gradient curve, no attention statistics)
            in any run; the message lists what there is.
    """
    if labels is None:
        labels = run_labels([s.run_dir for s in summaries])
    name = _choose_module(summaries, labels, module)
    _check_kinds(summaries, labels, name)
    runs = []
    for summary, label in zip(summaries, labels):
        entry = summary.modules[name]
        if not entry.epochs:
            raise SummaryError(f"run {label!r} ({summary.path}) has no epochs of module {name!r} yet.")
        if epoch == "last":
            chosen = entry.last_epoch(with_curve=True)
        elif epoch in entry.epochs:
            chosen = int(epoch)
        else:
            raise SummaryError(f"run {label!r} has no epoch {epoch} of module {name!r}; it has epochs "
                               f"{', '.join(str(e) for e in entry.epochs)}.")
        if row is not None and not 0 <= row < len(entry.rows):
            if entry.is_attention:
                heads = ", ".join(str(i) for i in range(len(entry.rows))) or "none"
                raise SummaryError(f"`--head {row}` is out of range for attention module {name!r} of run "
                                   f"{label!r}; its heads are {heads}.")
            rows = ", ".join(f"{i} ({r})" for i, r in enumerate(entry.rows))
            raise SummaryError(f"`--row {row}` is out of range for module {name!r} of run {label!r}; "
                               f"its rows are {rows}.")
        runs.append(ComparedRun(label, summary, entry, chosen, entry.epochs[chosen]))
    if not any(r.module.has_data(r.epoch) for r in runs):
        if runs[0].module.is_attention:
            raise SummaryError(f"no run has attention statistics (`entropy_norm`, `entropy`, `focus`) of "
                               f"module {name!r} at the chosen epoch; they are written for epochs whose "
                               f"training steps recorded the module.")
        raise SummaryError(f"no run has a gradient curve (`grad_norm`) of module {name!r} at the chosen "
                           f"epoch; record gradients (a training step with backward) to compare them.")
    return name, runs


def compare_table(runs: Sequence[ComparedRun], row: int | None = None) -> str:
    """The runs side by side: one line per run and row (an attention module: per head, its entropy and
    focus), with the findings of that epoch and row."""
    attention = bool(runs) and runs[0].module.is_attention
    stats = HEAD_STATS if attention else ROW_STATS
    noun = "head" if attention else "row"
    headers = ["run", "module", "epoch", "step", noun] + [_HEADERS[s] for s in stats] + ["findings"]
    lines = []
    for run in runs:
        rows = [row] if row is not None else range(max(len(run.module.rows), 1))
        for r in rows:
            found = [f for f in run.summary.findings if f.module == run.module.name and f.epoch == run.epoch
                     and ((f.head if attention else run.module.row_index(f.layer, f.direction)) == r
                          or (f.layer is None and f.head is None and r == rows[0]))]
            kinds = ", ".join(dict.fromkeys(f.kind + _finding_scope(f) for f in found))
            cells = [run.label, run.module.name, str(run.epoch), _format(run.stats.step, "{}"),
                     run.module.rows[r] if r < len(run.module.rows) else "-"]
            cells += [_format(run.stats.stat(s, r), _FORMATS[s]) for s in stats]
            lines.append(cells + [kinds or "-"])
    text = _table(headers, lines, left=[0, 1, 4, len(headers) - 1], indent="")
    if attention:
        text.append("(entropy_norm: entropy / log(keys), 1 = uniform over the keys, 0 = one key; entropy in "
                    "nats; focus: mean largest weight of a query)")
    # which calls each run's curve shows (an encoder and its decoder as one sequence, one call of several)
    text += [f"{run.label}: {run.module.name} shows {remark}" for run in runs for remark in run.stats.shown]
    return "\n".join(text) + "\n"


def _finding_scope(finding: Finding) -> str:
    if finding.gate:
        return f" ({finding.gate} gate)"
    return " (module)" if finding.layer is None and finding.head is None else ""


def draw_compare(runs: Sequence[ComparedRun], module: str, row: int | None = None,
                 epoch: int | str = "last") -> Figure:
    """One panel per row (or the one ``row``): each run's ``||dL/dh_t||`` against ``t`` on a log axis.

    Zeros are drawn as triangles on a floor a decade below the panel's smallest positive value; a step
    without a finite value inside a curve is a cross along the top edge; a shorter curve ends early.

    An attention module: its ``entropy_norm`` and ``focus`` per head, one panel each and one colour per
    run (see :func:`_draw_attention_compare`).
    """
    if runs and runs[0].module.is_attention:
        return _draw_attention_compare(runs, module, row, epoch)
    rows = [row] if row is not None else list(range(max(len(r.module.rows) for r in runs)))
    curves = [r.stats.grad_norm for r in runs if r.stats.grad_norm is not None]
    length = max((c.shape[1] for c in curves), default=1)
    alignments = {r.stats.alignment for r in runs if r.stats.grad_norm is not None}
    if len(alignments) > 1:
        ends = ", ".join(repr(r.label) for r in runs if r.stats.alignment == "end")
        raise SummaryError(f"the runs line their sequences up differently: {ends} counted back from each "
                           "sequence's end (lengths that differ, a loss at the end), the others from the start; "
                           "compare runs of one kind, or one epoch each with `--epoch`.")
    at_end = alignments == {"end"}
    same_epoch = len({r.epoch for r in runs}) == 1
    panel_height = 4.2 if len(rows) == 1 else 3.4 if len(rows) <= 4 else 2.6
    fig = Figure(figsize=(10.0, 1.2 + panel_height * len(rows)), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.08, hspace=0.06)
    axes = fig.subplots(len(rows), 1, squeeze=False, sharex=True)[:, 0]
    markers = "os^Dv<>pXh"
    show_markers = length <= 60
    for ax, r in zip(axes, rows):
        # each panel its own range: layers can sit decades apart, and the runs within a panel are the point
        # as the live pictures: values under 1e-7 of their own curve's peak (zeros included) are rounding
        floor, ceiling = _resolved_limits(*[_strip_trailing_nan(c[r]) for c in curves if r < len(c)])
        ax.set_yscale("log")
        handles = []
        any_zero = any_gap = False
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            label = common.escape_text(run.label)
            curve = run.stats.grad_norm
            values = curve[r] if curve is not None and r < len(curve) else None
            if values is None or not np.isfinite(values).any() and not (values == 0).any():
                handles.append(Line2D([], [], color=color, linestyle=":",
                                      label=f"{label}  (no gradient curve)"))
                continue
            values = _strip_trailing_nan(values)
            horizon = run.stats.stat("horizon", r)
            details = []
            if horizon is not None:
                details.append(f"horizon {horizon:.1f} steps" if math.isfinite(horizon) else "no horizon")
            if not same_epoch:
                details.append(f"epoch {run.epoch}")
            label += f"  ({', '.join(details)})" if details else ""
            x = np.arange(values.size) + (length - values.size if at_end else 0)  # curves end together
            good = _above_resolution(values)
            (line,) = ax.plot(x, np.where(good, values, np.nan), color=color, linewidth=1.8,
                              marker=markers[i % len(markers)] if show_markers else None, markersize=4.5,
                              markevery=max(1, values.size // 30), label=label, zorder=3)
            handles.append(line)
            zeros = np.isfinite(values) & ~good
            if zeros.any():
                any_zero = True
                ax.plot(x[zeros], np.full(int(zeros.sum()), floor), marker="v", linestyle="", color=color,
                        markersize=6, zorder=4)
            gaps = ~np.isfinite(values)
            if gaps.any():
                any_gap = True
                ax.plot(x[gaps], np.full(int(gaps.sum()), 0.97), marker="x", linestyle="", color=color,
                        markersize=7, markeredgewidth=1.8, transform=ax.get_xaxis_transform(), clip_on=False,
                        zorder=4)
        if any_zero:
            handles.append(Line2D([], [], color="0.35", marker="v", linestyle="", markersize=6,
                                  label=f"{NEAR_ZERO_LABEL} drawn at {floor:.0e}"))
        if any_gap:
            handles.append(Line2D([], [], color="0.35", marker="x", linestyle="", markersize=7,
                                  markeredgewidth=1.8, label="no finite value at this step"))
        ax.set_xlim(-0.5, length - 0.5)
        ax.set_ylim(floor / 2 if any_zero else floor * 5, ceiling * 2)  # room below for zeros only
        ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
        ax.grid(True, which="major", color="0.88", linewidth=0.8)
        ax.grid(True, which="minor", axis="y", color="0.95", linewidth=0.5)
        ax.tick_params(labelsize=10)
        ax.set_ylabel(r"$\Vert\partial L/\partial h_t\Vert$", fontsize=12)
        ax.set_title(_row_title(runs, r), fontsize=11, loc="left")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=10, frameon=False,
                  borderaxespad=0.0)
    if at_end:
        axes[-1].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v - (length - 1)))}"))
        axes[-1].set_xlabel("steps before each sequence's end", fontsize=11)
    else:
        axes[-1].set_xlabel("time step t (sequence position)", fontsize=11)
    if same_epoch:
        which = f"epoch {runs[0].epoch}"
        if epoch == "last" and len(runs) > 1:
            which += " (the last of each run)"
    else:
        which = "the last epoch of each run"
    fig.suptitle(f"{common.escape_text(module)}: gradient norm per time step, {which}", fontsize=14,
                 fontweight="bold")
    fig.supxlabel("each curve: the mean over the epoch's recordings of the mean over sequences of "
                  "||dL/dh_t||; log scale", fontsize=9, color="0.35")
    return fig


def _row_title(runs: Sequence[ComparedRun], r: int) -> str:
    labels = list(dict.fromkeys(run.module.rows[r] for run in runs if r < len(run.module.rows)))
    return common.escape_text(" / ".join(labels) if labels else f"row {r}")


# an attention comparison is drawn for where pictures are seen (a card of ~350 px, a slide): 840 px wide,
# few words in type whose glyphs stay 8 px or more high scaled to 350 px, the legend a row above the panels
_ATTENTION_PANELS = (("entropy_norm", "entropy_norm   1 = uniform, 0 = one key"),
                     ("focus", "focus   mean largest weight"))
_BIG_TITLE, _BIG_TEXT, _BIG_TICK = 16, 14, 13


def _draw_attention_compare(runs: Sequence[ComparedRun], module: str, row: int | None,
                            epoch: int | str) -> Figure:
    """``entropy_norm`` (above) and ``focus`` (below) of an attention module, one colour per run.

    Every head (or several): bars per head at each run's chosen epoch, a black tick across each bar at
    the run's first epoch (where training started it). One head (``row``, or a one-head module) of runs
    with several epochs: a line per run over the epochs. A head without a value says ``n/a``.
    """
    heads = [row] if row is not None else list(range(max(len(r.module.rows) for r in runs)))
    epochs = [[e for e in r.module.epochs if r.module.has_data(e)] for r in runs]
    over_epochs = len(heads) == 1 and any(len(e) > 1 for e in epochs)
    same_epoch = len({r.epoch for r in runs}) == 1
    fig = Figure(figsize=(5.6, 6.0), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06, hspace=0.05)
    axes = fig.subplots(2, 1, sharex=True)
    markers = "os^Dv<>pXh"
    handles: list[Any] = []
    for i, run in enumerate(runs):
        label = common.escape_text(run.label)
        if not same_epoch and not over_epochs:
            label += f" (epoch {run.epoch})"
        handles.append(Line2D([], [], color=f"C{i % 10}", linewidth=2.5 if over_epochs else 9,
                              marker=markers[i % len(markers)] if over_epochs else None, markersize=8,
                              label=label))
    first_drawn = False
    for ax, (stat, title) in zip(axes, _ATTENTION_PANELS):
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            if over_epochs:
                values = np.array([_number(run.module.epochs[e].stat(stat, heads[0])) for e in epochs[i]])
                ax.plot(epochs[i], values, color=color, linewidth=2.5, marker=markers[i % len(markers)],
                        markersize=8, zorder=3)
                if epoch != "last" and run.epoch in epochs[i]:  # the epoch the table shows
                    ax.plot([run.epoch], [_number(run.stats.stat(stat, heads[0]))], color=color,
                            marker=markers[i % len(markers)], markersize=13, markeredgecolor="black",
                            markeredgewidth=1.5, zorder=4)
                continue
            width = 0.84 / len(runs)
            x = np.arange(len(heads)) + (i - (len(runs) - 1) / 2) * width
            values = np.array([_number(run.stats.stat(stat, h)) for h in heads])
            known = np.isfinite(values)
            ax.bar(x[known], values[known], width=width * 0.9, color=color, zorder=3)
            for xi in x[~known]:
                ax.text(xi, 0.03, "n/a", rotation=90, ha="center", va="bottom", fontsize=_BIG_TICK - 2,
                        color="0.35")
            first = next((e for e in epochs[i] if e < run.epoch), None)
            if first is not None:
                start = np.array([_number(run.module.epochs[first].stat(stat, h)) for h in heads])
                ax.hlines(start, x - width * 0.45, x + width * 0.45, colors="black", linewidth=2.5, zorder=4)
                first_drawn = first_drawn or bool(np.isfinite(start).any())
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0, 0.5, 1])
        ax.set_yticks([0.25, 0.75], minor=True)
        ax.grid(True, axis="y", which="both", color="0.88", linewidth=0.8, zorder=0)
        ax.tick_params(labelsize=_BIG_TICK)
        ax.set_title(title, fontsize=_BIG_TEXT, loc="left")
    if over_epochs:
        axes[-1].xaxis.set_major_locator(MaxNLocator(8, integer=True))
        axes[-1].set_xlabel("epoch", fontsize=_BIG_TEXT)
        heading = f"{_head_title(runs, heads[0])} per epoch"
        if epoch != "last":
            handles.append(Line2D([], [], color="white", marker="o", markersize=11, markeredgecolor="black",
                                  markeredgewidth=1.5, label=f"epoch {epoch}"))
    else:
        axes[-1].set_xticks(range(len(heads)), [str(h) for h in heads])
        axes[-1].set_xlim(-0.5, len(heads) - 0.5)
        axes[-1].set_xlabel("head", fontsize=_BIG_TEXT)
        if same_epoch:
            heading = f"per head, epoch {runs[0].epoch}" + (" (last)" if epoch == "last" else "")
        else:
            heading = "per head, last epoch"  # each run's, in the legend
        if first_drawn:
            handles.append(Line2D([], [], color="black", linewidth=2.5, label="first epoch"))
    # the title heads the legend: a suptitle beside a legend outside the panels overlaps it
    title = f"{common.escape_text(module)}\nattention {heading}"
    longest = max(len(line) for line in title.splitlines())  # ~40 bold characters fit at _BIG_TITLE
    one_row = sum(len(h.get_label()) + 4 for h in handles) <= 40
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles) if one_row else 2,
               fontsize=_BIG_TEXT, frameon=False, handlelength=1.2 if not over_epochs else 2.0,
               columnspacing=1.2, title=title, alignment="center",
               title_fontproperties={"size": max(10.0, min(_BIG_TITLE, _BIG_TITLE * 40 / longest)),
                                     "weight": "bold"})
    return fig


def _head_title(runs: Sequence[ComparedRun], h: int) -> str:
    labels = list(dict.fromkeys(run.module.rows[h] for run in runs if h < len(run.module.rows)))
    return common.escape_text(" / ".join(labels) if labels else f"head {h}")


def _number(value: float | None) -> float:
    return math.nan if value is None else value


def _strip_trailing_nan(values: np.ndarray) -> np.ndarray:
    keep = np.flatnonzero(~np.isnan(values))
    return values[: int(keep[-1]) + 1] if keep.size else values[:0]


def save_figure(fig: Figure, out: str | os.PathLike[str]) -> Path:
    """Write ``fig`` in the format of ``out``'s suffix (png at 150 dpi, svg, pdf), without dates in the file.

    Raises:
        SummaryError: another suffix, a folder that does not exist, or a file that cannot be written.
    """
    out = Path(out)
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise SummaryError(f"`--out {out}`: unknown picture format {out.suffix or '(no suffix)'!r}; "
                           f"end the name with {', '.join(OUTPUT_FORMATS)}.")
    if not out.parent.is_dir():
        raise SummaryError(f"`--out {out}`: the folder {out.parent} does not exist.")
    metadata = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
    try:
        fig.savefig(out, format=fmt, dpi=PNG_DPI, metadata=metadata, facecolor="white")
    except OSError as error:
        raise SummaryError(f"cannot write {out} ({error.strerror or error}).") from None
    return out
