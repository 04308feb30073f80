"""Reading back what a run wrote for TensorBoard: every run under a logger's directory (the logger's own and
our ``rnnviz`` run), and which kind of summary each (run, tag) holds.

``EventAccumulator`` reads one directory, keeps images and histograms apart, and reads every file of it; it
cannot see the faults a real TensorBoard shows (two kinds under one tag, two writers in one directory).
:func:`tag_kinds` looks at the raw records instead, and the real-server tests check TensorBoard itself.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

_GUIDANCE = {"images": 0, "scalars": 0, "histograms": 0, "tensors": 0}


def run_dirs(log_dir: str | Path) -> list[Path]:
    """Every directory under ``log_dir`` (itself included) that holds an event file: one TensorBoard run each."""
    root = Path(log_dir)
    return sorted({p.parent for p in root.rglob("*tfevents*") if p.is_file()})


def tag_kinds(log_dir: str | Path) -> dict[tuple[str, str], set[str]]:
    """``(run, tag) -> {plugin, ...}`` over every record of every event file under ``log_dir``: the TensorBoard
    plugins (``images``, ``scalars``, ``histograms``, ``text``, ``custom_scalars``) that would claim the tag.
    TensorBoard gives one (run, tag) to one plugin, so a healthy run has exactly one per tag."""
    root = Path(log_dir)
    kinds: dict[tuple[str, str], set[str]] = defaultdict(set)
    for directory in run_dirs(root):
        run = str(directory.relative_to(root)) if directory != root else "."
        plugins: dict[str, str] = {}
        for path in sorted(directory.glob("*tfevents*")):
            # The loader migrates legacy summaries (images, simple values, histograms) to tensors carrying
            # their plugin's name, as TensorBoard itself does; metadata comes with a tag's first value only.
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name:
                        plugins[value.tag] = value.metadata.plugin_data.plugin_name
                    kinds[(run, value.tag)].add(plugins.get(value.tag, "tensor"))
    return dict(kinds)


class RunEvents:
    """What every run under a logger's directory holds, read like one ``EventAccumulator``.

    A tag is looked up in whichever run holds it; the same tag in two runs fails (no two writers of ours
    may share a tag).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.runs: dict[str, EventAccumulator] = {}
        for directory in run_dirs(self.log_dir):
            acc = EventAccumulator(str(directory), size_guidance=_GUIDANCE)
            acc.Reload()
            self.runs[str(directory.relative_to(self.log_dir)) if directory != self.log_dir else "."] = acc

    def Tags(self) -> dict[str, list[str]]:  # noqa: N802 - EventAccumulator's name
        merged: dict[str, list[str]] = defaultdict(list)
        for acc in self.runs.values():
            for kind, tags in acc.Tags().items():
                if isinstance(tags, list):
                    merged[kind].extend(tags)
        for kind, tags in merged.items():
            assert len(tags) == len(set(tags)), f"{kind} tags written by two runs: {sorted(tags)}"
        return dict(merged)

    def _find(self, kind: str, tag: str) -> EventAccumulator:
        holders = [acc for acc in self.runs.values() if tag in acc.Tags().get(kind, [])]
        if not holders:
            raise KeyError(f"no {kind} {tag!r} in any run of {self.log_dir} ({sorted(self.runs)})")
        assert len(holders) == 1, f"{kind} {tag!r} written by several runs"
        return holders[0]

    def Images(self, tag: str):  # noqa: N802
        return self._find("images", tag).Images(tag)

    def Scalars(self, tag: str):  # noqa: N802
        return self._find("scalars", tag).Scalars(tag)

    def Histograms(self, tag: str):  # noqa: N802
        return self._find("histograms", tag).Histograms(tag)

    def Tensors(self, tag: str):  # noqa: N802
        return self._find("tensors", tag).Tensors(tag)

    def run_of(self, kind: str, tag: str) -> str:
        """Which run holds ``tag``."""
        acc = self._find(kind, tag)
        return next(run for run, a in self.runs.items() if a is acc)
