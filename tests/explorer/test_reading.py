"""``explorer.reading``: every probe set under a log folder, from the event files, without a server."""

from __future__ import annotations

import pytest

from lightning_rnnviz.explorer.reading import ProbeSetError, read_probe_sets, runs_json
from lightning_rnnviz.names import PROBE_SET_TAG
from lightning_rnnviz.payload import unpack
from lightning_rnnviz.sinks.events import EventFile, blob_summary, scalars_summary, text_summary
from tests.helpers.probe_sets import probe_set_blob, write_probe_sets

TRAIN, VAL = f"{PROBE_SET_TAG}/train", f"{PROBE_SET_TAG}/val"


def test_every_probe_set_of_every_run_with_its_bytes(tmp_path):
    written = write_probe_sets(tmp_path, {"lstm/version_0/rnnviz": {"train": [5, 0, 10], "val": [4]},
                                          "gru/version_0/rnnviz": {"val": [4, 9]}})
    got, blobs = read_probe_sets(tmp_path)
    assert blobs == written
    assert got == {"runs": [
        {"run": "gru/version_0/rnnviz", "tags": {VAL: {"steps": [4, 9], "sizes": [
            len(written["gru/version_0/rnnviz", VAL, 4]), len(written["gru/version_0/rnnviz", VAL, 9])]}}},
        {"run": "lstm/version_0/rnnviz", "tags": {
            TRAIN: {"steps": [0, 5, 10], "sizes": [len(written["lstm/version_0/rnnviz", TRAIN, s])
                                                   for s in (0, 5, 10)]},
            VAL: {"steps": [4], "sizes": [len(written["lstm/version_0/rnnviz", VAL, 4])]}}},
    ]}
    header, _ = unpack(blobs["lstm/version_0/rnnviz", TRAIN, 5])
    assert (header["step"], header["source"]) == (5, "training")


def test_the_log_folder_itself_is_run_dot(tmp_path):
    written = write_probe_sets(tmp_path, {".": {"val": [1]}})
    assert read_probe_sets(tmp_path) == ({"runs": [{"run": ".", "tags": {VAL: {
        "steps": [1], "sizes": [len(written[".", VAL, 1])]}}}]}, written)


def test_the_last_write_of_a_step_wins(tmp_path):
    """As the Rust loader (TensorBoard's default) serves it; files in name order, records in file order."""
    write_probe_sets(tmp_path, {"r": {"val": [2, 4]}}, seed=0)
    later = write_probe_sets(tmp_path, {"r": {"val": [4]}}, seed=1)  # a second event file, later by name
    assert len(list((tmp_path / "r").glob("*tfevents*"))) == 2
    _, blobs = read_probe_sets(tmp_path)
    assert blobs["r", VAL, 4] == later["r", VAL, 4] != probe_set_blob(4, "val", seed=0)
    events = EventFile(tmp_path / "s")  # twice in one file
    events.add_summary(blob_summary(VAL, b"first"), 3)
    events.add_summary(blob_summary(VAL, b"second"), 3)
    events.close()
    assert read_probe_sets(tmp_path)[1]["s", VAL, 3] == b"second"


def test_other_summaries_are_left_alone(tmp_path):
    events = EventFile(tmp_path / "run")
    events.add_summary(scalars_summary({"loss": 0.5}), 1)
    events.add_summary(text_summary("notes", "hello"), 1)
    events.add_summary(blob_summary(TRAIN, b"blob"), 1)
    events.close()
    assert read_probe_sets(tmp_path) == ({"runs": [{"run": "run", "tags": {TRAIN: {"steps": [1], "sizes": [4]}}}]},
                                         {("run", TRAIN, 1): b"blob"})


def test_a_record_still_being_written_is_left_for_later(tmp_path):
    written = write_probe_sets(tmp_path, {"r": {"train": [1, 2]}})
    path = next((tmp_path / "r").glob("*tfevents*"))
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the last record cut short
    _, blobs = read_probe_sets(tmp_path)
    assert blobs == {("r", TRAIN, 1): written["r", TRAIN, 1]}


def test_no_probe_sets_and_no_folder(tmp_path):
    EventFile(tmp_path / "empty").close()
    assert read_probe_sets(tmp_path) == ({"runs": []}, {})
    with pytest.raises(ProbeSetError, match="is not a folder"):
        read_probe_sets(tmp_path / "missing")


def test_runs_json_sorts_runs_and_steps():
    blobs = {("b", "t", 3): b"xyz", ("a", "t", 9): b"1", ("a", "t", 2): b"12"}
    assert runs_json(blobs) == {"runs": [{"run": "a", "tags": {"t": {"steps": [2, 9], "sizes": [2, 1]}}},
                                         {"run": "b", "tags": {"t": {"steps": [3], "sizes": [3]}}}]}
