"""What the callback drew and measured, kept as one ``.npz`` file per recording step for notebooks.

Each file ``<directory>/records/step_<step:08d>.npz`` holds, for one step:

- ``payload/<tag>/<name>``: the arrays of each picture's reduced payload (what its ``Job`` drew);
- ``record/<prefix>/<module>/<name>``: with ``full=True``, every tensor of the full records (float32 or
  int64), e.g. ``record/rnnviz/encoder.rnn/hidden`` or ``record/rnnviz/encoder.rnn/gates/forget``;
- ``__meta__``: a 0-d unicode array with one JSON document: the format and version, the step, every
  payload's kind and non-array fields, the statistics ``{tag: value}`` and the full records' non-tensor
  fields.

JSON cannot say NaN, Inf, tuples, non-string keys or arrays, so :data:`FORMAT` version 1 writes a few
values as one-key objects, and reading turns them back:

- ``{"$float": "nan" | "inf" | "-inf"}``: a non-finite float;
- ``{"$array": "<name>"}``: an array nested inside a field (stored as ``payload/<tag>/<name>``);
- ``{"$dict": [[key, value], ...]}``: a mapping whose keys are not all strings (or start with ``$``);

tuples become lists and numpy scalars numbers. Nothing is pickled: every file reads with
``np.load(path, allow_pickle=False)``.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from lightning_rnnviz.render.jobs import Job
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     keeper = RecordKeeper(Path(folder))
    ...     payload = {"norm": np.array([[1.0, np.nan]]), "name": "rnn"}
    ...     keeper.job(Job("grad_norm", payload, "rnnviz/grad_norm/rnn", 8))
    ...     keeper.scalars({"rnnviz/grad_norm/rnn/log10_ratio": float("-inf")}, 8)
    ...     keeper.close()
    ...     [step] = load_records(folder)
    >>> step.step, step.payloads["rnnviz/grad_norm/rnn"]["name"], step.stats
    (8, 'rnn', {'rnnviz/grad_norm/rnn/log10_ratio': -inf})
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_rnnviz.render.jobs import Job

if TYPE_CHECKING:
    from lightning_rnnviz.probe.records import AttentionRecord, RNNRecord

__all__ = ["FORMAT", "VERSION", "RecordKeeper", "RecordsError", "StepRecords", "load_records"]

FORMAT = "lightning_rnnviz.records"
VERSION = 1
META = "__meta__"
MB = 1024 * 1024
FULL_WARN_MB = 50.0
_HOW_TO_SAVE = "train with `RNNViz(save_records=True)` to write them"


class RecordsError(ValueError):
    """A records file or folder that cannot be read; the message names the file and what is wrong."""


# --- JSON with NaN, tuples, int keys and nested arrays ------------------------------------------------------
class _Unsupported(TypeError):
    pass


def _encode(value: Any, name: str, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON-able data; arrays nested in it go to ``arrays`` under ``name``-based names."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _encode_float(float(value))
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a tensor; no torch import needed here
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return _encode(value.tolist(), name, arrays)
        if value.dtype.kind not in "biufcUS":
            raise _Unsupported(f"array of dtype {value.dtype}")
        arrays[name] = np.array(value)  # a copy: the caller may reuse its buffer
        return {"$array": name}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{name}/{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{name}/{k}", arrays) for k, v in value.items()}
        pairs = []
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool, np.integer, np.floating)) or k is None:
                raise _Unsupported(f"mapping key {k!r}")
            pairs.append([_encode(k, name, arrays), _encode(v, f"{name}/{k}", arrays)])
        return {"$dict": pairs}
    raise _Unsupported(type(value).__name__)


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    return {"$float": "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"}


def _decode(value: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (key, inner), = value.items()
        if key == "$float":
            if inner not in ("nan", "inf", "-inf"):
                raise ValueError(f"{where}: `$float` value {inner!r} is not 'nan', 'inf' or '-inf'")
            return float(inner)
        if key == "$array":
            if not isinstance(inner, str) or inner not in arrays:
                raise ValueError(f"{where}: names the array {inner!r}, which the file does not hold")
            return arrays[inner]
        if key == "$dict":
            if not isinstance(inner, list) or not all(isinstance(p, list) and len(p) == 2 for p in inner):
                raise ValueError(f"{where}: `$dict` is not a list of [key, value] pairs")
            return {_hashable(_decode(k, arrays, where)): _decode(v, arrays, where) for k, v in inner}
    return {k: _decode(v, arrays, where) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, np.ndarray)):
        raise TypeError(f"a `$dict` key is {type(key).__name__}, not a string or number")
    return key


# --- writing ----------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """What one step has gathered so far, encoded."""

    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)  # tag -> {kind, fields, arrays}
    stats: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> {kind, fields, arrays}
    full_bytes: int = 0  # uncompressed bytes of the full records

    def empty(self) -> bool:
        return not (self.payloads or self.stats or self.records)


def _default_warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class RecordKeeper:
    """Keeps what each recording step drew (every ``Job``'s reduced payload) and measured (its statistics),
    and optionally the full records, as one compressed ``.npz`` per step; read them with
    :func:`load_records`.

    Data for a step gathers in memory until :meth:`flush`, or until data for another step arrives (the
    previous step is flushed then). Data for a step that was written already (e.g. the validation sample
    recorded at the same step as training) is merged into its file. Each file is written to a temporary
    name and moved into place, so a reader sees a whole file or none.

    Args:
        directory: the run's data folder; files go to ``<directory>/records/step_<step:08d>.npz``.
        full: also keep the full records (every tensor of every ``RNNRecord``/``AttentionRecord``).
        max_mb: bound on the files this keeper writes, in MB (2**20 bytes); once the next file would
            cross it, that step and every later one are skipped, with one warning (a step's data merged
            into its file later: the file keeps what came first).
        warn: receives each warning's message (default: :func:`warnings.warn` with a ``UserWarning``).

    Raises:
        ValueError: ``max_mb`` not a positive number, or ``full`` not a bool.
    """

    def __init__(self, directory: str | os.PathLike[str], full: bool = False, max_mb: float = 256,
                 warn: Callable[[str], None] | None = None) -> None:
        if not isinstance(full, bool):
            raise ValueError(f"`full`={full!r} must be True or False.")  # noqa: TRY004 - as every argument check
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb > 0 \
                or not math.isfinite(max_mb):
            raise ValueError(f"`max_mb`={max_mb!r} must be a positive number of megabytes, e.g. 256.")
        self.folder = Path(directory) / "records"
        self.full = full
        self.max_mb = float(max_mb)
        self.warn = warn if warn is not None else _default_warn
        self.total_bytes = 0  # of the files this keeper has written
        self.skipped_from: int | None = None  # first step not saved because of the bound
        self._written: dict[int, int] = {}  # step -> bytes of its file
        self._step: int | None = None
        self._pending = _Pending()
        self._warned: set[str] = set()
        self._closed = False

    def path_for(self, step: int) -> Path:
        """``<directory>/records/step_<step:08d>.npz``."""
        return self.folder / f"step_{int(step):08d}.npz"

    # --- gathering --------------------------------------------------------------------------------------
    def _at(self, step: int) -> _Pending | None:
        """The pending data of ``step`` (flushing another step first); ``None`` when nothing is kept."""
        if self._closed:
            raise RuntimeError("This `RecordKeeper` is closed; make a new one to keep more records.")
        if self.skipped_from is not None:
            return None
        step = int(step)
        if self._step != step:
            self.flush()
            if self.skipped_from is not None:
                return None
            self._step = step
            self._pending = _Pending()
        return self._pending

    def job(self, job: Job) -> None:
        """Keep ``job.payload`` under ``job.tag`` for ``job.step`` (a later job with the same tag and step
        replaces it). A field that cannot be stored without pickling is left out, with one warning."""
        pending = self._at(job.step)
        if pending is None:
            return
        fields: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for name, value in job.payload.items():
            name = str(name)
            try:
                encoded = _encode(value, name, arrays)
            except _Unsupported as error:
                self._warn_once(f"field:{job.kind}:{name}",
                                f"The `{name}` field of {job.kind!r} payloads ({error}) cannot be saved "
                                f"without pickling; the records leave it out.")
                continue
            if encoded != {"$array": name}:  # an array field of its own is listed in `arrays` only
                fields[name] = encoded
        pending.payloads[job.tag] = {"kind": job.kind, "fields": fields, "arrays": arrays}

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Keep the statistics ``{tag: value}`` of ``step`` (a later value for a tag replaces it)."""
        if not values:
            return
        pending = self._at(step)
        if pending is None:
            return
        for tag, value in values.items():
            pending.stats[str(tag)] = _encode_float(float(value))

    def full_records(self, recording: Mapping[str, RNNRecord | AttentionRecord], step: int,
                     prefix: str = "rnnviz") -> None:
        """Keep every tensor of every record of ``recording`` as float32 (int64 for integer tensors), under
        ``<prefix>/<module>`` (``prefix`` as in the tags: ``"rnnviz"``, ``"rnnviz/val"``). Does nothing
        unless the keeper was made with ``full=True``; warns once when one step's full records pass 50 MB.
        """
        if not self.full or not len(recording):
            return
        pending = self._at(step)
        if pending is None:
            return
        for name, record in recording.items():
            fields: dict[str, Any] = {}
            arrays: dict[str, np.ndarray] = {}
            for spec in dataclasses.fields(record):
                if spec.name == "derived":
                    continue  # caches, not data
                value = getattr(record, spec.name)
                try:
                    fields[spec.name] = _encode_record_value(value, spec.name, arrays)
                except _Unsupported as error:
                    self._warn_once(f"record:{spec.name}",
                                    f"The `{spec.name}` field of {type(record).__name__} ({error}) cannot be "
                                    f"saved without pickling; the full records leave it out.")
            fields = {n: v for n, v in fields.items() if v != {"$array": n}}
            key = f"{prefix}/{name}" if prefix else str(name)
            old = pending.records.get(key)
            if old is not None:
                pending.full_bytes -= sum(a.nbytes for a in old["arrays"].values())
            pending.records[key] = {"kind": type(record).__name__, "fields": fields, "arrays": arrays}
            pending.full_bytes += sum(a.nbytes for a in arrays.values())
        if pending.full_bytes > FULL_WARN_MB * MB:
            self._warn_once("full-size",
                            f"The full records of step {step} take {_mb(pending.full_bytes)} MB (uncompressed); "
                            f"saving them at every recording step slows training and fills the disk. Record "
                            f"less often or fewer modules, or keep only the reduced payloads (without full "
                            f"records).")

    # --- writing ----------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the current step's file (compressed, through a temporary file); nothing when idle."""
        step, pending = self._step, self._pending
        self._step, self._pending = None, _Pending()
        if step is None or pending.empty() or self.skipped_from is not None:
            return
        arrays, meta = _assemble(step, pending)
        if step in self._written:
            _merge_previous(self.path_for(step), meta, arrays)
        arrays[META] = np.array(json.dumps(meta, allow_nan=False, separators=(",", ":")))
        path = self.path_for(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                np.savez_compressed(handle, **arrays)
            size = temporary.stat().st_size
            previous = self._written.get(step, 0)
            if self.total_bytes - previous + size > self.max_mb * MB:
                self.skipped_from = step
                skipped = (f"what came later for step {step} (its file keeps what came first) and later "
                           f"steps are" if previous else f"step {step} and later steps are")
                self.warn(
                    f"The saved records reached {_mb(self.total_bytes)} MB of the {self.max_mb:g} MB bound; "
                    f"{skipped} not saved. Raise `RNNViz(save_records_max_mb=...)` to keep more."
                )
                return
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        self.total_bytes += size - previous
        self._written[step] = size

    def close(self) -> None:
        """Flush the last step; later calls (other than :meth:`close`) raise."""
        if not self._closed:
            self.flush()
            self._closed = True

    # --- helpers ----------------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)


def _mb(size: int) -> str:
    """Bytes as MB (2**20 bytes) to read: ``"312.4"``, ``"0.0156"``."""
    value = size / MB
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _merge_previous(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Add to a step's new content what its earlier file holds and the new content does not replace."""
    try:
        old_meta, old_arrays = _read_raw(path)
    except (RecordsError, OSError):
        return  # gone or replaced since: the step starts afresh
    for section, prefix in (("payloads", "payload"), ("records", "record")):
        for key, entry in old_meta.get(section, {}).items():
            if key in meta[section]:
                continue
            meta[section][key] = entry
            for name in entry["arrays"]:
                arrays[f"{prefix}/{key}/{name}"] = old_arrays[f"{prefix}/{key}/{name}"]
    meta["stats"] = {**old_meta.get("stats", {}), **meta["stats"]}


def _encode_record_value(value: Any, name: str, arrays: dict[str, np.ndarray]) -> Any:
    """A full record's field: tensors as float32 / int64 arrays, a dict of tensors as ``name/<key>``."""
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            array = tensor.float().numpy()
        elif str(tensor.dtype) == "torch.bool":
            array = tensor.numpy()
        else:
            array = tensor.long().numpy()
        arrays[name] = array  # no copy: a finished record is not written to again
        return {"$array": name}
    if isinstance(value, Mapping):
        return {str(k): _encode_record_value(v, f"{name}/{k}", arrays) for k, v in value.items()}
    return _encode(value, name, arrays)


def _assemble(step: int, pending: _Pending) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The npz members and the ``__meta__`` document of one step."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": int(step),
                            "payloads": {}, "stats": dict(pending.stats), "records": {}}
    sections = (("payloads", "payload", pending.payloads), ("records", "record", pending.records))
    for section, prefix, entries in sections:
        for key, entry in entries.items():
            for name, array in entry["arrays"].items():
                member = f"{prefix}/{key}/{name}"
                if member in arrays:  # only a tag that is another tag plus a field name can collide
                    raise ValueError(f"two arrays of step {step} would both be stored as {member!r}")
                arrays[member] = array
            meta[section][key] = {"kind": entry["kind"], "fields": entry["fields"],
                                  "arrays": list(entry["arrays"])}
    return arrays, meta


# --- reading ----------------------------------------------------------------------------------------------
@dataclass
class StepRecords:
    """What one recording step kept (see :func:`load_records`).

    Attributes:
        step: the training step.
        payloads: tag -> the reduced payload its picture was drawn from, field -> value (arrays as numpy
            arrays, NaN/Inf as floats, tuples as lists, integer keys as ints).
        stats: statistic tag -> value.
        records: full records (empty unless saved with ``full=True``): ``<prefix>/<module>`` -> array name
            -> array, e.g. ``records["rnnviz/encoder.rnn"]["gates/forget"]``; shapes as in ``RNNRecord``.
        kinds: tag -> the payload's kind (``"hidden"``, ``"gates"``, ``"grad_norm"``, ``"grad_decay"``,
            ``"attention"``).
        record_fields: ``<prefix>/<module>`` -> the record's fields other than its top-level arrays:
            ``name``, ``kind`` (``"LSTM"``, ``"MultiheadAttention"``, ...), ``num_layers``, ``notes``, ...;
            ``None`` for a tensor that was ``None`` (e.g. ``hidden_grad`` without a backward), and
            ``gates`` as a dict of arrays.
        record_types: ``<prefix>/<module>`` -> ``"RNNRecord"`` or ``"AttentionRecord"``.
        path: the file it was read from.
    """

    step: int
    payloads: dict[str, dict[str, Any]]
    stats: dict[str, float]
    records: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    record_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    record_types: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def job(self, tag: str, renderer: str = "matplotlib") -> Job:
        """The picture ``tag`` as a :class:`~lightning_rnnviz.render.jobs.Job`, to draw again with
        :func:`lightning_rnnviz.render.jobs.draw` (e.g. with the other renderer).

        Raises:
            KeyError: no payload under ``tag``; the message lists the tags.
        """
        if tag not in self.payloads:
            raise KeyError(f"Step {self.step} has no payload {tag!r}; it has {sorted(self.payloads)}.")
        return Job(self.kinds.get(tag, ""), self.payloads[tag], tag, self.step, renderer)

    def to_record(self, module: str) -> RNNRecord | AttentionRecord:
        """Rebuild the full record ``module`` (``"<prefix>/<name>"``) as an ``RNNRecord`` or
        ``AttentionRecord`` of torch tensors, for the ``render`` functions (needs torch).

        Raises:
            KeyError: no full record under ``module``; the message lists those there are.
        """
        if module not in self.records:
            hint = "" if self.records else " (save them with full records on)"
            raise KeyError(f"Step {self.step} has no full record {module!r}{hint}; "
                           f"it has {sorted(self.records)}.")
        import torch

        from lightning_rnnviz.probe import records as probe_records

        info = self.record_fields.get(module, {})
        classes = {"RNNRecord": probe_records.RNNRecord, "AttentionRecord": probe_records.AttentionRecord}
        cls = classes.get(self.record_types.get(module, ""))
        if cls is None:
            raise KeyError(f"The full record {module!r} is a {self.record_types.get(module)!r}; this version "
                           f"rebuilds only {sorted(classes)}.")
        arrays = self.records[module]
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            if not spec.init:
                continue
            if spec.name in arrays:
                values[spec.name] = torch.from_numpy(np.array(arrays[spec.name]))
            elif isinstance(info.get(spec.name), dict):
                values[spec.name] = {k: torch.from_numpy(np.array(v)) for k, v in info[spec.name].items()}
            elif spec.name in info:
                value = info[spec.name]
                values[spec.name] = _tuples(value)
        return cls(**values)


def _tuples(value: Any) -> Any:
    """JSON's lists back as the tuples a record holds (``calls`` nests them)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_records(path: str | os.PathLike[str], *, skip_damaged: bool = False) -> list[StepRecords]:
    """Read the records a run kept, sorted by step.

    Args:
        path: a run folder (``<path>/records/*.npz``, ``<path>/rnnviz/records/*.npz``, or a single
            ``**/rnnviz/records`` below it, as a TensorBoard logger's ``version_0/rnnviz/``), or one ``.npz``.
        skip_damaged: leave out, with a warning, files that cannot be read, instead of raising.

    Raises:
        RecordsError: the path does not exist, holds no records, holds several runs' records, or a file is
            damaged, truncated, foreign or from a newer version (the message names the file).
    """
    path = Path(path)
    if not path.exists():
        raise RecordsError(f"{path}: no such file or folder.")
    if path.is_file():
        return [_read_file(path)]
    folder = _records_folder(path)
    steps = []
    for file in sorted(folder.glob("*.npz")):
        try:
            steps.append(_read_file(file))
        except RecordsError as error:
            if not skip_damaged:
                raise RecordsError(f"{error} (pass `skip_damaged=True` to read the other files)") from None
            warnings.warn(f"skipped: {error}", UserWarning, stacklevel=2)
    return sorted(steps, key=lambda s: s.step)


def _records_folder(path: Path) -> Path:
    for candidate in (path / "records", path / "rnnviz" / "records"):
        if candidate.is_dir() and any(candidate.glob("*.npz")):
            return candidate
    found = sorted({p.parent for p in path.glob("**/rnnviz/records/*.npz")})
    if len(found) == 1:
        return found[0]
    if found:
        listing = ", ".join(str(p.parent.parent) for p in found)  # the runs: <run>/rnnviz/records
        raise RecordsError(f"{path}: holds the records of {len(found)} runs; pass one of them: {listing}.")
    raise RecordsError(
        f"{path}: no records found (looked for records/*.npz, rnnviz/records/*.npz and "
        f"**/rnnviz/records/*.npz); {_HOW_TO_SAVE}."
    )


def _read_file(path: Path) -> StepRecords:
    """One step's file, checked and decoded; every failure is a :class:`RecordsError` that names the file."""
    meta, arrays = _read_raw(path)
    try:
        return _unpack(path, meta, arrays)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise RecordsError(f"{path}: is damaged: its `{META}` does not match the format ({error}).") from None


def _read_raw(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The checked ``__meta__`` document and the arrays it lists, read without unpickling."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise RecordsError(f"{path}: cannot be read ({error.strerror or error}).") from None
    if not head:
        raise RecordsError(f"{path}: is empty, not a records file (an interrupted copy?).")
    if head[:2] != b"PK":
        raise RecordsError(f"{path}: is not an .npz file (it does not start with a zip header); "
                           f"records files are written by `RecordKeeper`.")
    try:
        # our own handle: numpy leaves a file it opened unclosed when the zip turns out broken
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            names = set(npz.files)
            if META not in names:
                raise RecordsError(
                    f"{path}: has no `{META}` entry, so it is not a lightning_rnnviz records file "
                    f"(a plain .npz or another zip archive?)."
                )
            meta_array = npz[META]
            if meta_array.dtype.kind != "U" or meta_array.ndim != 0:
                raise RecordsError(f"{path}: its `{META}` entry is a {meta_array.dtype} array of shape "
                                   f"{meta_array.shape}, not a JSON string: a damaged or foreign file.")
            meta = _parse_meta(path, str(meta_array[()]))
            wanted = _members(path, meta)
            missing = sorted(set(wanted) - names)
            if missing:
                raise RecordsError(f"{path}: is damaged: `{META}` lists arrays the file does not hold: "
                                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")
            arrays = {member: npz[member] for member in wanted}
    except RecordsError:
        raise
    except zipfile.BadZipFile as error:
        if "not a zip file" in str(error):  # a zip header, but no directory at the end
            raise RecordsError(f"{path}: is truncated: the zip archive ends before its directory (an "
                               f"interrupted copy?).") from None
        raise RecordsError(f"{path}: is damaged ({error}).") from None
    except ValueError as error:
        if "pickle" in str(error):
            raise RecordsError(f"{path}: holds pickled (object) data, which records files never do; "
                               f"refusing to read it.") from None
        raise RecordsError(f"{path}: is damaged ({error}).") from None
    except Exception as error:  # noqa: BLE001 - zlib, EOF and OS errors of a broken archive, named below
        raise RecordsError(f"{path}: is truncated or damaged ({type(error).__name__}: {error}).") from None
    return meta, arrays


def _parse_meta(path: Path, text: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordsError(f"{path}: its `{META}` is not valid JSON ({error}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecordsError(f"{path}: its `{META}` does not say format {FORMAT!r}; not a lightning_rnnviz "
                           f"records file.")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RecordsError(f"{path}: has an invalid records version {version!r}: a damaged file.")
    if version > VERSION:
        raise RecordsError(f"{path}: was written by a newer lightning_rnnviz (records version {version}; "
                           f"this one reads version {VERSION}); upgrade lightning_rnnviz to read it.")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise RecordsError(f"{path}: its `{META}` has no integer `step`: a damaged file.")
    for section in ("payloads", "stats", "records"):
        if not isinstance(meta.get(section, {}), dict):
            raise RecordsError(f"{path}: its `{META}` field `{section}` is not an object: a damaged file.")
    return meta


def _members(path: Path, meta: Mapping[str, Any]) -> list[str]:
    members = []
    for section, prefix in (("payloads", "payload"), ("records", "record")):
        for key, entry in meta.get(section, {}).items():
            names = entry.get("arrays", []) if isinstance(entry, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise RecordsError(f"{path}: its `{META}` entry {section}[{key!r}] has no list of `arrays`: "
                                   f"a damaged file.")
            members.extend(f"{prefix}/{key}/{name}" for name in names)
    return members


def _unpack(path: Path, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> StepRecords:
    result = StepRecords(step=meta["step"], payloads={}, stats={}, path=path)
    for tag, entry in meta.get("payloads", {}).items():
        own = {name: arrays[f"payload/{tag}/{name}"] for name in entry["arrays"]}
        payload = _decode(entry.get("fields", {}), own, f"payload {tag!r}")
        for name in _top(entry):
            payload[name] = own[name]
        result.payloads[tag] = payload
        result.kinds[tag] = str(entry.get("kind", ""))
    for tag, value in meta.get("stats", {}).items():
        result.stats[tag] = float(_decode(value, {}, f"stat {tag!r}"))
    for module, entry in meta.get("records", {}).items():
        own = {name: arrays[f"record/{module}/{name}"] for name in entry["arrays"]}
        result.records[module] = own
        result.record_fields[module] = _decode(entry.get("fields", {}), own, f"record {module!r}")
        result.record_types[module] = str(entry.get("kind", ""))
    return result


def _top(entry: Mapping[str, Any]) -> list[str]:
    """The arrays that are fields of their own (those no ``$array`` inside another field refers to)."""
    referenced = set(_references(entry.get("fields", {})))
    return [name for name in entry["arrays"] if name not in referenced]


def _references(value: Any) -> Iterable[str]:
    if isinstance(value, list):
        for v in value:
            yield from _references(v)
    elif isinstance(value, dict):
        if len(value) == 1 and "$array" in value:
            yield value["$array"]
        else:
            for v in value.values():
                yield from _references(v)
