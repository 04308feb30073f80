"""Every probe set under a log folder, read from the event files without a TensorBoard server (for the HTML
export): ``runs_json, blobs = read_probe_sets("lightning_logs")``.

A run is a folder that holds event files (``*tfevents*``), named as TensorBoard names it: its path relative
to the log folder with ``/`` between parts, ``"."`` for the log folder itself. Of each run, the summaries of
our plugin (``SummaryMetadata.plugin_data.plugin_name == "rnnviz"``) are kept; files are read in name order
and records in file order, and the last write of a run, tag and step wins, as TensorBoard shows it. Unlike
TensorBoard, every step is kept (no ``--samples_per_plugin`` sampling). A file's last record that is still
being written (cut short) is left for the next read.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event

from lightning_rnnviz.names import PLUGIN_NAME
from lightning_rnnviz.sinks.events import masked_crc

Blobs = dict[tuple[str, str, int], bytes]


class ProbeSetError(ValueError):
    """A log folder that cannot be read as one, or that holds no probe set."""


def read_probe_sets(logdir: str | os.PathLike[str]) -> tuple[dict[str, Any], Blobs]:
    """The probe sets under ``logdir``: ``(runs_json, blobs)``.

    ``runs_json`` is what the plugin's ``/runs`` route answers (``{"runs": [{"run", "tags": {tag: {"steps",
    "sizes"}}}]}``, runs sorted, steps ascending, sizes in bytes) and ``blobs`` maps ``(run, tag, step)`` to
    the blob. A folder without probe sets gives ``({"runs": []}, {})``.

    Raises:
        ProbeSetError: ``logdir`` is not a folder.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise ProbeSetError(f"{os.fspath(logdir)!r} is not a folder")
    blobs: Blobs = {}
    for folder, files in _runs(root):
        run = "." if folder == root else folder.relative_to(root).as_posix()
        ours: dict[str, bool] = {}  # tag -> whether it is our plugin's (known from its first metadata)
        for name in files:
            for event in _events(folder / name):
                for value in event.summary.value:
                    if value.HasField("metadata") and value.tag not in ours:
                        ours[value.tag] = value.metadata.plugin_data.plugin_name == PLUGIN_NAME
                    if ours.get(value.tag) and value.HasField("tensor") and value.tensor.string_val:
                        blobs[(run, value.tag, int(event.step))] = bytes(value.tensor.string_val[0])
    return runs_json(blobs), blobs


def runs_json(blobs: Blobs) -> dict[str, Any]:
    """The ``/runs`` JSON of ``blobs``."""
    tree: dict[str, dict[str, dict[int, int]]] = {}
    for (run, tag, step), blob in blobs.items():
        tree.setdefault(run, {}).setdefault(tag, {})[step] = len(blob)
    return {"runs": [
        {"run": run, "tags": {tag: {"steps": sorted(steps), "sizes": [steps[s] for s in sorted(steps)]}
                              for tag, steps in sorted(tree[run].items())}}
        for run in sorted(tree)
    ]}


def _runs(root: Path) -> list[tuple[Path, list[str]]]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        events = sorted(name for name in files if "tfevents" in name)
        if events:
            found.append((Path(folder), events))
    return found


def _events(path: Path):
    """The events of one TFRecord file; reading stops at a record cut short or a broken CRC."""
    with open(path, "rb") as file:
        while True:
            header = file.read(12)
            if len(header) < 12:
                return
            if header[8:] != masked_crc(header[:8]):
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = file.read(length)
            if len(data) < length or file.read(4) != masked_crc(data):
                return
            yield Event.FromString(data)
