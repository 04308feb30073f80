"""Read back what a user of W&B or MLflow would see, with the real packages.

``read_wandb_offline`` reads an offline W&B run: the history rows (the data behind every chart and media
panel) from the run's ``.wandb`` transaction log, and the media files under ``files/media``.
``read_mlflow`` reads an MLflow run through :class:`mlflow.MlflowClient`: metric histories, the images of
MLflow's image-key API (``log_image(key=..., step=...)``), and the other artifacts.

An offline W&B run keeps its history only in ``run-<id>.wandb``. Older SDKs (0.16, for one) read that
file with ``wandb.sdk.internal.datastore.DataStore``; wandb 0.31 has no Python reader of it (its Go core
reads and writes it). Its framing is LevelDB's log format behind a 7-byte ``:W&B`` header: 32 KiB blocks
of chunks, each ``crc32 (4) | length (2) | type (1) | data``, with the CRC-32 (zlib's) of the type byte
and the data; the records are ``wandb_internal_pb2.Record`` messages. The datastore is used where it
exists, this file's own reader otherwise.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------- W&B

_WANDB_HEADER = b":W&B"
_BLOCK = 32768
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks_to_records(data: bytes) -> Iterator[bytes]:
    """The records of a ``.wandb`` file's bytes (LevelDB log framing); a torn tail is ignored."""
    if data[:4] != _WANDB_HEADER:
        raise ValueError("not a W&B transaction log (no ':W&B' header)")
    position, pending = 7, b""
    while position + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK - position % _BLOCK
        if room < _CHUNK_HEADER.size:  # a block's last few bytes are padding
            position += room
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        body = data[position + _CHUNK_HEADER.size : position + _CHUNK_HEADER.size + length]
        if kind == 0 and length == 0:  # zero padding up to the end of a block
            position += room
            continue
        if len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            return  # a record still being written, or a torn write at the end
        position += _CHUNK_HEADER.size + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""


def _records(path: Path) -> Iterator[Any]:
    """The ``Record`` protos of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:  # wandb up to ~0.17 ships a reader of its own
        from wandb.sdk.internal import datastore  # type: ignore[attr-defined]
    except ImportError:
        datastore = None
    if datastore is not None:
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        try:
            while (found := store.scan_data()) is not None:
                record = pb.Record()
                record.ParseFromString(found)
                yield record
        finally:
            store.close()
        return
    for blob in _chunks_to_records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(blob)
        yield record


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    case = item.WhichOneof("value") if "value" in {o.name for o in item.DESCRIPTOR.oneofs} else None
    if case is None or case == "none":
        return None
    if case == "json":
        return json.loads(item.json)
    return getattr(item, case)


def _history_row(history: Any) -> dict[str, Any]:
    """One history record as a dict; values split over nested keys (wandb >= 0.2x) are put back together."""
    row: dict[str, Any] = {}
    for item in history.item:
        path = [item.key] if item.key else list(item.nested_key)
        value = _item_value(item)
        target = row
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    if "_step" not in row and history.HasField("step"):
        row["_step"] = history.step.num
    return row


_MEDIA_NAME = re.compile(r"^(?P<key>.+)_(?P<step>\d+)_(?P<hash>[0-9a-f]+)\.(?P<ext>\w+)$")


def _media_key_step(relative: str, subdir: str) -> tuple[str, int] | None:
    """``rnnviz/hidden/rnn_7_<sha>.png`` (under ``media/images``) -> ``("rnnviz/hidden/rnn", 7)``: W&B
    names each media file ``<key>_<history _step>_<sha256[:20]>.<ext>``, a ``/`` in the key making
    folders."""
    name = relative.removeprefix(subdir.rstrip("/") + "/")
    found = _MEDIA_NAME.match(name)
    return (found["key"], int(found["step"])) if found else None


def find_wandb_run_dir(save_dir: str | Path, run_id: str | None = None) -> Path:
    """The run folder (``<save_dir>/wandb/offline-run-<time>-<id>``) of ``run_id``, or the newest."""
    root = Path(save_dir)
    candidates = sorted(
        p for base in (root / "wandb", root) if base.is_dir() for p in base.glob("*run-*") if p.is_dir()
    )
    if run_id is not None:
        candidates = [p for p in candidates if p.name.endswith(f"-{run_id}")]
    if not candidates:
        raise FileNotFoundError(f"no W&B run folder under {root}" + (f" for run {run_id}" if run_id else ""))
    return candidates[-1]


def read_wandb_offline(
    save_dir: str | Path, run_id: str | None = None, step_key: str = "trainer/global_step"
) -> dict:
    """What an offline W&B run holds, as a user would see it once synced.

    Returns a dict with:

    - ``run_dir``, ``files_dir``: the run folder and its ``files`` folder;
    - ``rows``: every history row (``_step`` is W&B's own row counter; Lightning's step is ``step_key``);
    - ``metrics``: ``{key: [(step, value), ...]}`` of the numeric values, ``step`` being the row's
      ``step_key`` (``None`` where the row has none), in logged order;
    - ``images``: ``{key: {step: [file path, ...]}}``, each path checked to exist under
      ``files/media/images``;
    - ``image_rows``: ``{key: {step: [_step, ...]}}``: the history rows that hold those images;
    - ``image_files``: every file under ``files/media/images`` (relative to it), with the ``(key,
      _step)`` W&B encoded in its name;
    - ``histograms``: ``{key: {step: {"values": [...], "bins": [...]}}}``;
    - ``html``: ``{key: {step: text of the logged HTML file}}``;
    - ``step_metrics``: ``{glob or name: step metric}`` from ``define_metric``;
    - ``exited``: whether the run was finished (its exit record is there).
    """
    run_dir = find_wandb_run_dir(save_dir, run_id)
    logs = sorted(run_dir.glob("*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    files_dir = run_dir / "files"
    rows: list[dict[str, Any]] = []
    step_metrics: dict[str, str] = {}
    exited = False
    for record in _records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(_history_row(record.history))
        elif kind == "metric" and record.metric.step_metric:
            step_metrics[record.metric.glob_name or record.metric.name] = record.metric.step_metric
        elif kind == "exit":
            exited = True

    metrics: dict[str, list[tuple[Any, Any]]] = {}
    images: dict[str, dict[Any, list[Path]]] = {}
    image_rows: dict[str, dict[Any, list[int]]] = {}
    histograms: dict[str, dict[Any, dict[str, Any]]] = {}
    html: dict[str, dict[Any, str]] = {}
    for row in rows:
        step = row.get(step_key)
        for key, value in row.items():
            if key.startswith("_") or key == step_key:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(key, []).append((step, value))
            elif isinstance(value, dict):
                kind = value.get("_type")
                if kind == "image-file":
                    paths = [value["path"]]
                elif kind in ("images/separated", "images"):
                    paths = list(value.get("filenames", []))
                elif kind == "histogram":
                    histograms.setdefault(key, {})[step] = {"values": value["values"], "bins": value["bins"]}
                    continue
                elif kind == "html-file":
                    html.setdefault(key, {})[step] = (files_dir / value["path"]).read_text(encoding="utf-8")
                    continue
                else:
                    continue
                for relative in paths:
                    path = files_dir / relative
                    if not path.is_file():
                        raise FileNotFoundError(
                            f"history row {row.get('_step')} names {relative}, not on disk"
                        )
                    images.setdefault(key, {}).setdefault(step, []).append(path)
                    image_rows.setdefault(key, {}).setdefault(step, []).append(row.get("_step"))

    media = files_dir / "media" / "images"
    image_files = {}
    if media.is_dir():
        for path in sorted(p for p in media.rglob("*") if p.is_file()):
            relative = path.relative_to(media).as_posix()
            image_files[relative] = _media_key_step(relative, "")
    return {
        "run_dir": run_dir,
        "files_dir": files_dir,
        "rows": rows,
        "metrics": metrics,
        "images": images,
        "image_rows": image_rows,
        "image_files": image_files,
        "histograms": histograms,
        "html": html,
        "step_metrics": step_metrics,
        "exited": exited,
    }


# ------------------------------------------------------------------------------------------- MLflow

# ``images/<key, "/" as "~">+step+<n>+timestamp+<ms>+<id>[+compressed].<ext>`` from MLflow 3.11; from 2.12
# to 3.10, "#" for "/" and "%" between the fields (the id is not always hex: 3.10 wrote "rb847821-...").
_MLFLOW_IMAGE = re.compile(
    r"^(?P<key>.+?)(?P<sep>[+%])step(?P=sep)(?P<step>\d+)(?P=sep)timestamp(?P=sep)(?P<ts>\d+)"
    r"(?P=sep)(?P<uuid>[0-9A-Za-z-]+)(?P<compressed>(?P=sep)compressed)?\.(?P<ext>\w+)$"
)


def parse_mlflow_image_name(name: str) -> dict[str, Any] | None:
    """The key, step and kind of an artifact under ``images/`` written by ``log_image(key=, step=)``."""
    found = _MLFLOW_IMAGE.match(name)
    if found is None:
        return None
    return {
        "key": found["key"].replace("~", "/").replace("#", "/"),
        "step": int(found["step"]),
        "timestamp": int(found["ts"]),
        "compressed": found["compressed"] is not None,
        "ext": found["ext"],
    }


def _walk_artifacts(client: Any, run_id: str, path: str | None = None) -> Iterator[Any]:
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            yield from _walk_artifacts(client, run_id, info.path)
        else:
            yield info


def read_mlflow(tracking_uri: str, run_id: str) -> dict:
    """What an MLflow run holds, read through ``MlflowClient``.

    Returns a dict with:

    - ``run``: the ``mlflow.entities.Run``; ``tags``: its tags;
    - ``metrics``: ``{key: [(step, value), ...]}`` from ``get_metric_history``, by step;
    - ``images``: ``{key: {step: local path of the full-size PNG}}`` of the image-key API (the
      ``+compressed`` thumbnails in ``thumbnails`` alike);
    - ``artifacts``: ``{artifact path: size}`` of every artifact;
    - ``text``: ``{artifact path: text}`` of the ``.md``/``.txt``/``.html`` artifacts;
    - ``step_images``: ``{artifact path: local path}`` of other ``.png`` artifacts (the legacy
      ``artifact_file`` form).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    metrics = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }
    artifacts: dict[str, int | None] = {}
    images: dict[str, dict[int, str]] = {}
    thumbnails: dict[str, dict[int, str]] = {}
    text: dict[str, str] = {}
    step_images: dict[str, str] = {}
    for info in _walk_artifacts(client, run_id):
        artifacts[info.path] = info.file_size
        parsed = (
            parse_mlflow_image_name(info.path.removeprefix("images/"))
            if info.path.startswith("images/")
            else None
        )
        if parsed is not None:
            local = client.download_artifacts(run_id, info.path)
            (thumbnails if parsed["compressed"] else images).setdefault(parsed["key"], {})[parsed["step"]] = (
                local
            )
        elif info.path.endswith((".md", ".txt", ".html")):
            text[info.path] = Path(client.download_artifacts(run_id, info.path)).read_text(encoding="utf-8")
        elif info.path.endswith(".png"):
            step_images[info.path] = client.download_artifacts(run_id, info.path)
    return {
        "run": run,
        "tags": dict(run.data.tags),
        "metrics": metrics,
        "images": images,
        "thumbnails": thumbnails,
        "artifacts": artifacts,
        "text": text,
        "step_images": step_images,
    }
