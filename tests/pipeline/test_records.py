"""Records for notebooks: what each recording step drew and measured, one ``.npz`` per step, read back
exactly, bounded in size, written atomically, never pickled, and every bad file named with what is wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_rnnviz import render
from lightning_rnnviz.pipeline import records as records_module
from lightning_rnnviz.pipeline.records import RecordKeeper, RecordsError, StepRecords, load_records
from lightning_rnnviz.probe.records import Recording
from lightning_rnnviz.render.jobs import Job, draw
from tests.render.conftest import make_attention, make_rnn


class Warned(list):
    """Collects the keeper's warnings."""

    def __call__(self, message: str) -> None:
        self.append(message)


def keeper_at(tmp_path: Path, **kwargs) -> tuple[RecordKeeper, Warned]:
    warned = Warned()
    return RecordKeeper(tmp_path, warn=warned, **kwargs), warned


def odd_payload() -> dict:
    """Every kind of value a reduced payload holds."""
    return {
        "values": np.array([[1.5, np.nan], [np.inf, -np.inf]], dtype=np.float32),
        "units": np.arange(3, dtype=np.int64),
        "mask": np.array([True, False]),
        "tokens": np.array(["the", "cat"]),
        "scalar_array": np.array(2.5),
        "name": "encoder.rnn",
        "empty": "",
        "nan": float("nan"),
        "inf": float("inf"),
        "minus_inf": -np.inf,
        "np_float": np.float32(0.25),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "exact": False,
        "labels": None,
        "row_labels": ["layer 0", "layer 0 reverse"],
        "notes": ("replayed", "approximate"),
        "nested": [1, [2.0, float("nan")], None, "x"],
        "history": {0: np.ones((2, 3)), 3: np.full((2, 1), np.nan)},
        "horizons": {0: [1.0, None], 3: [float("nan"), 2.0]},
        "by_name": {"forget": np.zeros(2, np.float32), "$odd": 1},
        "object_list": np.array([["a", 1], ["b", None]], dtype=object),
    }


def test_round_trip_of_payloads_stats_and_files(tmp_path):
    keeper, warned = keeper_at(tmp_path)
    payload = odd_payload()
    keeper.job(Job("hidden", payload, "rnnviz/hidden/encoder.rnn", 8))
    keeper.scalars({"rnnviz/hidden/encoder.rnn/mean_abs": 0.5, "rnnviz/x/nan": float("nan"),
                    "rnnviz/x/inf": float("-inf"), "rnnviz/x/tensor": torch.tensor(3.0)}, 8)
    keeper.close()
    assert warned == []
    assert [p.name for p in (tmp_path / "records").iterdir()] == ["step_00000008.npz"]

    [step] = load_records(tmp_path)
    assert isinstance(step, StepRecords)
    assert step.step == 8 and step.path == tmp_path / "records" / "step_00000008.npz"
    assert step.kinds == {"rnnviz/hidden/encoder.rnn": "hidden"}
    got = step.payloads["rnnviz/hidden/encoder.rnn"]
    assert set(got) == set(payload)
    for name in ("values", "units", "mask", "tokens", "scalar_array"):
        assert got[name].dtype == payload[name].dtype, name
        np.testing.assert_array_equal(got[name], payload[name])
    assert got["name"] == "encoder.rnn" and got["empty"] == ""
    assert np.isnan(got["nan"]) and got["inf"] == np.inf and got["minus_inf"] == -np.inf
    assert (got["np_float"], got["np_int"], got["np_bool"]) == (0.25, 7, True)
    assert type(got["np_float"]) is float and type(got["np_int"]) is int and type(got["np_bool"]) is bool
    assert got["exact"] is False and got["labels"] is None
    assert got["row_labels"] == ["layer 0", "layer 0 reverse"]
    assert got["notes"] == ["replayed", "approximate"]  # tuples come back as lists
    assert got["nested"][:1] == [1] and got["nested"][1][0] == 2.0 and np.isnan(got["nested"][1][1])
    assert got["nested"][2:] == [None, "x"]
    assert sorted(got["history"]) == [0, 3]  # integer keys stay integers
    np.testing.assert_array_equal(got["history"][0], np.ones((2, 3)))
    assert np.isnan(got["history"][3]).all()
    assert got["horizons"][0] == [1.0, None] and np.isnan(got["horizons"][3][0])
    assert set(got["by_name"]) == {"forget", "$odd"} and got["by_name"]["$odd"] == 1
    assert got["object_list"] == [["a", 1], ["b", None]]  # object arrays are stored as JSON, not pickled
    assert step.stats["rnnviz/hidden/encoder.rnn/mean_abs"] == 0.5
    assert np.isnan(step.stats["rnnviz/x/nan"]) and step.stats["rnnviz/x/inf"] == -np.inf
    assert step.stats["rnnviz/x/tensor"] == 3.0
    assert step.records == {}


def test_npz_schema_as_documented(tmp_path):
    keeper, _ = keeper_at(tmp_path, full=True)
    keeper.job(Job("grad_decay", {"history": {2: np.ones((1, 4))}, "name": "rnn", "norm": np.zeros(3)},
                   "rnnviz/grad_decay/rnn", 12))
    keeper.scalars({"rnnviz/grad_norm/rnn/horizon": 3.5}, 12)
    keeper.full_records(Recording({"rnn": make_rnn("GRU")}), 12, prefix="rnnviz/val")
    keeper.flush()
    path = tmp_path / "records" / "step_00000012.npz"
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        meta = json.loads(str(npz["__meta__"][()]))
        assert npz["__meta__"].dtype.kind == "U" and npz["__meta__"].ndim == 0
    assert {"payload/rnnviz/grad_decay/rnn/norm", "payload/rnnviz/grad_decay/rnn/history/2",
            "record/rnnviz/val/rnn/hidden", "record/rnnviz/val/rnn/gates/update", "__meta__"} <= names
    assert meta["format"] == "lightning_rnnviz.records" and meta["version"] == 1 and meta["step"] == 12
    assert meta["payloads"]["rnnviz/grad_decay/rnn"] == {
        "kind": "grad_decay",
        "fields": {"history": {"$dict": [[2, {"$array": "history/2"}]]}, "name": "rnn"},
        "arrays": ["history/2", "norm"],
    }
    assert meta["stats"] == {"rnnviz/grad_norm/rnn/horizon": 3.5}
    record = meta["records"]["rnnviz/val/rnn"]
    assert record["kind"] == "RNNRecord"
    assert record["fields"]["kind"] == "GRU" and record["fields"]["cell"] is None
    assert record["fields"]["gates"] == {g: {"$array": f"gates/{g}"} for g in ("reset", "update", "new")}
    assert set(record["arrays"]) == {"hidden", "hidden_grad", "lengths", "gates/reset", "gates/update",
                                     "gates/new"}


def same_record(a, b) -> bool:
    """Every init field equal, tensors exactly (dtype, shape and values)."""
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype \
                and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and x == y
    return type(a) is type(b) and all(
        same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.init)


def test_full_records_round_trip_exactly(tmp_path):
    lstm = make_rnn("LSTM", layers=2, directions=2)
    lstm.notes = ("dropout replayed",)
    attention = make_attention(key_lengths=[8, 5])
    keeper, warned = keeper_at(tmp_path, full=True)
    keeper.full_records(Recording({"encoder.rnn": lstm, "decoder.attn": attention}), 3)
    keeper.close()
    assert warned == []
    [step] = load_records(tmp_path / "records" / "step_00000003.npz")
    assert sorted(step.records) == ["rnnviz/decoder.attn", "rnnviz/encoder.rnn"]
    arrays = step.records["rnnviz/encoder.rnn"]
    assert arrays["hidden"].dtype == np.float32 and arrays["lengths"].dtype == np.int64
    np.testing.assert_array_equal(arrays["gates/forget"], lstm.gates["forget"].numpy())
    assert step.record_types == {"rnnviz/encoder.rnn": "RNNRecord", "rnnviz/decoder.attn": "AttentionRecord"}
    assert step.record_fields["rnnviz/encoder.rnn"]["num_directions"] == 2
    assert step.record_fields["rnnviz/encoder.rnn"]["cell_grad"] is None
    rebuilt = step.to_record("rnnviz/encoder.rnn")
    assert same_record(rebuilt, lstm)
    assert same_record(step.to_record("rnnviz/decoder.attn"), attention)
    assert render.grad_stats(rebuilt) == render.grad_stats(lstm)
    with pytest.raises(KeyError, match=r"no full record 'rnn'.*rnnviz/decoder.attn"):
        step.to_record("rnn")


def test_full_records_are_kept_only_when_asked(tmp_path):
    keeper, _ = keeper_at(tmp_path)
    keeper.full_records(Recording({"rnn": make_rnn()}), 1)
    keeper.close()
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("renderer", ["fast", "matplotlib"])
def test_pictures_drawn_from_records_are_the_pictures_drawn_in_training(tmp_path, renderer):
    lstm, attention = make_rnn("LSTM", directions=2), make_attention(key_lengths=[8, 6])
    jobs = [
        Job("hidden", render.reduce_hidden(lstm), "rnnviz/hidden/encoder.rnn", 4, renderer),
        Job("gates", render.reduce_gates(lstm), "rnnviz/gates/encoder.rnn", 4, renderer),
        Job("grad_norm", render.reduce_grad_norm(lstm), "rnnviz/grad_norm/encoder.rnn", 4, renderer),
        Job("attention", render.reduce_attention(attention), "rnnviz/attention/decoder.attn", 4, renderer),
        Job("grad_decay", {"history": {0: lstm.grad_norm.numpy(), 1: lstm.grad_norm.numpy() / 2},
                           "name": "encoder.rnn", "layer_labels": ["layer 0 forward", "layer 0 reverse"]},
            "rnnviz/grad_decay/encoder.rnn", 4, renderer),
    ]
    keeper, _ = keeper_at(tmp_path)
    for job in jobs:
        keeper.job(job)
    keeper.close()
    [step] = load_records(tmp_path)
    for job in jobs:
        again = step.job(job.tag, renderer)
        assert again.kind == job.kind and again.step == 4
        np.testing.assert_array_equal(draw(again), draw(job), err_msg=job.tag)
    with pytest.raises(KeyError, match="has no payload 'rnnviz/nothing'"):
        step.job("rnnviz/nothing")


def test_every_file_reads_without_pickle(tmp_path):
    keeper, _ = keeper_at(tmp_path, full=True)
    keeper.job(Job("hidden", odd_payload(), "rnnviz/hidden/m", 1))
    keeper.full_records(Recording({"m": make_rnn("LSTM")}), 1)
    keeper.job(Job("hidden", {"v": np.zeros(2)}, "rnnviz/hidden/m", 2))
    keeper.close()
    for path in sorted((tmp_path / "records").glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                assert npz[name].dtype.kind != "O", name


def test_a_new_step_flushes_the_previous_one_and_a_step_seen_again_is_merged(tmp_path):
    keeper, _ = keeper_at(tmp_path, full=True)
    keeper.job(Job("grad_norm", {"norm": np.ones(3)}, "rnnviz/grad_norm/rnn", 5))
    keeper.scalars({"a": 1.0, "b": 2.0}, 5)
    assert not (tmp_path / "records").exists()  # gathered in memory until the step changes or a flush
    keeper.scalars({"a": 1.5}, 6)
    assert (tmp_path / "records" / "step_00000005.npz").is_file()
    keeper.flush()
    # the validation sample of step 5 arrives after step 5 was written: its file gets both
    keeper.job(Job("hidden", {"values": np.zeros(2)}, "rnnviz/val/hidden/rnn", 5))
    keeper.full_records(Recording({"rnn": make_rnn("GRU")}), 5, prefix="rnnviz/val")
    keeper.scalars({"b": 3.0}, 5)
    keeper.close()
    steps = load_records(tmp_path)
    assert [s.step for s in steps] == [5, 6]
    five = steps[0]
    assert sorted(five.payloads) == ["rnnviz/grad_norm/rnn", "rnnviz/val/hidden/rnn"]
    np.testing.assert_array_equal(five.payloads["rnnviz/grad_norm/rnn"]["norm"], np.ones(3))
    assert five.stats == {"a": 1.0, "b": 3.0}
    assert list(five.records) == ["rnnviz/val/rnn"]
    assert steps[1].stats == {"a": 1.5}
    assert keeper.total_bytes == sum(p.stat().st_size for p in (tmp_path / "records").glob("*.npz"))


def test_writes_are_atomic(tmp_path, monkeypatch):
    keeper, _ = keeper_at(tmp_path)
    keeper.job(Job("hidden", {"values": np.arange(4.0)}, "rnnviz/hidden/m", 1))
    keeper.flush()
    target = tmp_path / "records" / "step_00000001.npz"
    before = target.read_bytes()
    seen = []
    real_replace = os.replace

    def checking_replace(source, destination):
        source, destination = Path(source), Path(destination)
        # the whole file exists under a temporary name beside the target before it takes the target's place
        seen.append((source.parent == destination.parent, source.name.endswith(".tmp"),
                     zipfile.is_zipfile(source), destination.read_bytes() == before))
        real_replace(source, destination)

    monkeypatch.setattr(records_module.os, "replace", checking_replace)
    keeper.job(Job("hidden", {"values": np.arange(5.0)}, "rnnviz/hidden/m", 1))
    keeper.flush()
    assert seen == [(True, True, True, True)]

    def failing_savez(handle, **arrays):
        handle.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records_module.np, "savez_compressed", failing_savez)
    keeper.job(Job("hidden", {"values": np.arange(6.0)}, "rnnviz/hidden/m", 1))
    with pytest.raises(OSError, match="No space left"):
        keeper.flush()
    # the old file stays, and no temporary file is left behind
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["step_00000001.npz"]
    [step] = load_records(tmp_path)
    np.testing.assert_array_equal(step.payloads["rnnviz/hidden/m"]["values"], np.arange(5.0))


def test_size_bound_skips_later_steps_with_one_warning(tmp_path):
    keeper, warned = keeper_at(tmp_path, max_mb=0.02)  # 20 KiB
    noise = np.random.default_rng(0)
    for step in range(6):  # incompressible arrays of 8 KiB
        keeper.job(Job("hidden", {"values": noise.random(1024)}, "rnnviz/hidden/m", step))
        keeper.scalars({"s": float(step)}, step)
    keeper.close()
    written = sorted(p.name for p in (tmp_path / "records").iterdir())
    assert written == ["step_00000000.npz", "step_00000001.npz"]
    assert keeper.skipped_from == 2
    assert len(warned) == 1
    assert f"reached {keeper.total_bytes / 2**20:.3g} MB of the 0.02 MB bound" in warned[0]
    assert "step 2 and later steps are not saved" in warned[0]
    assert "`RNNViz(save_records_max_mb=...)`" in warned[0]
    assert keeper.total_bytes <= 0.02 * 1024 * 1024


def test_a_merge_past_the_bound_keeps_the_steps_file_as_it_was_and_says_so(tmp_path):
    """The validation sample of a step arrives after the step was written, and merged in it would cross the
    bound: the step's file keeps the training recording, and the warning says what was not saved."""
    keeper, warned = keeper_at(tmp_path, max_mb=0.02)  # 20 KiB
    noise = np.random.default_rng(0)
    keeper.job(Job("hidden", {"values": noise.random(1024)}, "rnnviz/hidden/m", 4))  # 8 KiB
    keeper.flush()
    first = (tmp_path / "records" / "step_00000004.npz").read_bytes()
    keeper.job(Job("hidden", {"values": noise.random(2048)}, "rnnviz/val/hidden/m", 4))  # 16 KiB more
    keeper.close()
    assert (tmp_path / "records" / "step_00000004.npz").read_bytes() == first
    assert keeper.skipped_from == 4 and keeper.total_bytes == len(first)
    [message] = warned
    assert "what came later for step 4 (its file keeps what came first) and later steps are not saved" \
        in message


def test_default_warning_goes_through_warnings(tmp_path):
    keeper = RecordKeeper(tmp_path, max_mb=1e-6)
    keeper.scalars({"s": 1.0}, 1)
    with pytest.warns(UserWarning, match=r"save_records_max_mb"):
        keeper.close()


def test_full_records_warn_once_past_50_mb(tmp_path, monkeypatch):
    record = make_rnn("LSTM", batch=4, time=64, hidden=32)
    keeper, warned = keeper_at(tmp_path, full=True)
    keeper.full_records(Recording({"rnn": record}), 1)  # about 0.2 MB: no warning
    assert warned == []
    monkeypatch.setattr(records_module, "FULL_WARN_MB", 0.1)
    keeper.full_records(Recording({"rnn": record}), 2)
    keeper.full_records(Recording({"rnn": record}), 3)
    keeper.close()
    assert len(warned) == 1
    size = sum(a.nbytes for a in load_records(tmp_path)[1].records["rnnviz/rnn"].values()) / 2**20
    assert warned[0].startswith(f"The full records of step 2 take {size:.3g} MB (uncompressed)")


def test_unstorable_fields_are_left_out_with_one_warning(tmp_path):
    keeper, warned = keeper_at(tmp_path)
    for step in (1, 2):
        keeper.job(Job("hidden", {"values": np.ones(2), "callback": print}, "rnnviz/hidden/m", step))
    keeper.close()
    assert len(warned) == 1 and "`callback` field of 'hidden' payloads" in warned[0]
    assert set(load_records(tmp_path)[0].payloads["rnnviz/hidden/m"]) == {"values"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_mb": 0}, r"`max_mb`=0 must be a positive number"),
        ({"max_mb": -1.0}, r"`max_mb`=-1.0 must be a positive number"),
        ({"max_mb": float("nan")}, r"`max_mb`=nan must be a positive number"),
        ({"max_mb": True}, r"`max_mb`=True must be a positive number"),
        ({"full": "yes"}, r"`full`='yes' must be True or False"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecordKeeper(tmp_path, **kwargs)


def test_closed_keeper_refuses_more(tmp_path):
    keeper, _ = keeper_at(tmp_path)
    keeper.close()
    keeper.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed; make a new one"):
        keeper.scalars({"a": 1.0}, 1)


# --- finding and refusing files -----------------------------------------------------------------------------
def write_step(directory: Path, step: int = 1) -> Path:
    keeper = RecordKeeper(directory)
    keeper.scalars({"a": float(step)}, step)
    keeper.close()
    return keeper.path_for(step)


@pytest.mark.parametrize("layout", ["records", "rnnviz/records", "logs/gru/version_0/rnnviz/records"])
def test_run_folder_layouts(tmp_path, layout):
    write_step(tmp_path / Path(layout).parent, 3)
    write_step(tmp_path / Path(layout).parent, 1)
    assert [s.step for s in load_records(tmp_path)] == [1, 3]


def test_several_runs_below_a_folder_are_listed(tmp_path):
    for kind in ("rnn", "gru"):
        write_step(tmp_path / kind / "version_0" / "rnnviz")
    runs = r"holds the records of 2 runs; pass one of them: \S*/gru/version_0, \S*/rnn/version_0\.$"
    with pytest.raises(RecordsError, match=runs):
        load_records(tmp_path)
    assert len(load_records(tmp_path / "gru" / "version_0")) == 1


def test_empty_folder_says_how_to_make_records(tmp_path):
    (tmp_path / "records").mkdir()
    with pytest.raises(RecordsError, match=r"no records found .*RNNViz\(save_records=True\)"):
        load_records(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(RecordsError, match="no such file or folder"):
        load_records(tmp_path / "nothing")


def _plain_npz(path: Path) -> None:
    np.savez(path, a=np.arange(3))


def _random_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


def _text(path: Path) -> None:
    path.write_text("step,value\n1,0.5\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    data = write_step(path.parent / "source").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupted(path: Path) -> None:
    keeper = RecordKeeper(path.parent / "source")
    keeper.job(Job("hidden", {"values": np.random.default_rng(0).random(5000)}, "rnnviz/hidden/m", 1))
    keeper.close()
    data = bytearray(keeper.path_for(1).read_bytes())
    middle = len(data) // 3  # inside the first member's compressed data
    data[middle : middle + 40] = bytes(40)
    path.write_bytes(bytes(data))


def _meta_as(text: str) -> callable:
    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, __meta__=np.array(text))
    return write


def _newer(path: Path) -> None:
    _meta_as(json.dumps({"format": "lightning_rnnviz.records", "version": 2, "step": 1}))(path)


def _pickled_meta(path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, __meta__=np.array([{"format": "lightning_rnnviz.records"}], dtype=object))


def _missing_array(path: Path) -> None:
    meta = {"format": "lightning_rnnviz.records", "version": 1, "step": 1, "stats": {},
            "payloads": {"rnnviz/hidden/m": {"kind": "hidden", "fields": {}, "arrays": ["values"]}}}
    _meta_as(json.dumps(meta))(path)


def _bad_marker(path: Path) -> None:
    meta = {"format": "lightning_rnnviz.records", "version": 1, "step": 1, "stats": {"a": {"$float": "big"}}}
    _meta_as(json.dumps(meta))(path)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_random_zip, r"has no `__meta__` entry, so it is not a lightning_rnnviz records file"),
        (_plain_npz, r"has no `__meta__` entry"),
        (_text, r"is not an \.npz file \(it does not start with a zip header\)"),
        (_empty, r"is empty"),
        (_truncated, r"is truncated: the zip archive ends before its directory"),
        (_corrupted, r"is damaged \(Bad CRC-32 for file 'payload/rnnviz/hidden/m/values.npy'\)"),
        (_newer, r"was written by a newer lightning_rnnviz \(records version 2; this one reads version 1\)"),
        (_pickled_meta, r"holds pickled \(object\) data.*refusing to read it"),
        (_meta_as("{not json"), r"its `__meta__` is not valid JSON"),
        (_meta_as('{"format": "something.else", "version": 1}'),
         r"does not say format 'lightning_rnnviz.records'"),
        (_meta_as('{"format": "lightning_rnnviz.records", "version": "1", "step": 1}'),
         r"invalid records version '1'"),
        (_meta_as('{"format": "lightning_rnnviz.records", "version": 1}'), r"has no integer `step`"),
        (_missing_array, r"lists arrays the file does not hold: payload/rnnviz/hidden/m/values"),
        (_bad_marker, r"does not match the format \(stat 'a': `\$float` value 'big'"),
    ],
)
def test_bad_files_are_named_with_what_is_wrong(tmp_path, make, match):
    path = tmp_path / "run" / "records" / "step_00000001.npz"
    path.parent.mkdir(parents=True)
    make(path)
    with pytest.raises(RecordsError, match=match) as caught:
        load_records(path)
    assert str(path) in str(caught.value)
    error = caught.value  # no numpy or zipfile traceback chained to it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    # the same file inside a run folder: named, and the way to read the others is said
    with pytest.raises(RecordsError, match=r"skip_damaged=True"):
        load_records(tmp_path / "run")


def test_skip_damaged_reads_the_others(tmp_path):
    write_step(tmp_path, 4)
    (tmp_path / "records" / "step_00000002.npz").write_text("oops")
    with pytest.warns(UserWarning, match=r"skipped: .*step_00000002\.npz: is not an \.npz file"):
        steps = load_records(tmp_path, skip_damaged=True)
    assert [s.step for s in steps] == [4]


def test_temporary_files_are_not_read(tmp_path):
    path = write_step(tmp_path, 1)
    path.with_name(f".{path.name}.123.tmp").write_bytes(b"PK half")
    assert [s.step for s in load_records(tmp_path)] == [1]
