"""The ``rnnviz`` TensorBoard plugin: found by TensorBoard through the package's entry point, light to import,
and serving the probe sets through both of TensorBoard's loaders (a real server on event files written as
the explorer's contract says)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest
from tensorboard.plugins import base_plugin

from lightning_rnnviz.explorer.plugin import RnnvizPlugin
from lightning_rnnviz.explorer.reading import runs_json
from lightning_rnnviz.names import PLUGIN_NAME, PROBE_SET_TAG
from tests.helpers.probe_sets import write_probe_sets
from tests.helpers.tensorboard_server import (
    LOADERS,
    TensorBoardHTTPError,
    TensorBoardServer,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
TRAIN, VAL = f"{PROBE_SET_TAG}/train", f"{PROBE_SET_TAG}/val"
# fewer steps per tag than TensorBoard keeps by default (10), so every one is served
RUNS = {"fit/version_0/rnnviz": {"train": [0, 1, 2, 3, 5, 8], "val": [2, 4]}, "other": {"val": [7]}}


# --------------------------------------------------------------------------------------- registration
def test_the_package_registers_the_plugin_for_tensorboard():
    """TensorBoard loads ``tensorboard_plugins`` entry points (``tensorboard.default.get_dynamic_plugins``):
    the installed package must name our plugin class there (reinstall after changing pyproject.toml)."""
    ours = [e for e in metadata.entry_points(group="tensorboard_plugins") if e.name == PLUGIN_NAME]
    assert len(ours) == 1, f"no single {PLUGIN_NAME!r} entry point in group tensorboard_plugins: {ours}"
    assert ours[0].value == "lightning_rnnviz.explorer.plugin:RnnvizPlugin"
    assert ours[0].load() is RnnvizPlugin
    from tensorboard import default

    assert RnnvizPlugin in default.get_dynamic_plugins()


def test_the_plugin_describes_an_iframed_tab():
    plugin = RnnvizPlugin(base_plugin.TBContext(data_provider=None, sampling_hints={}))
    assert plugin.plugin_name == PLUGIN_NAME == "rnnviz"
    meta = plugin.frontend_metadata()
    assert (meta.es_module_path, meta.tab_name, meta.element_name) == ("/index.js", "rnnviz", None)
    assert tuple(plugin.data_plugin_names()) == ("rnnviz",)
    assert set(plugin.get_plugin_apps()) == {"/index.js", "/explorer.js", "/runs", "/probe_set"}
    assert plugin.is_active() is False


def test_the_static_files_are_package_data():
    static = resources.files("lightning_rnnviz.explorer").joinpath("static")
    assert static.joinpath("index.js").is_file()
    assert '"explorer/static/*.js"' in _pyproject_package_data()


def _pyproject_package_data() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return text[text.index("[tool.setuptools.package-data]"):].split("\n[", 1)[0]


def test_importing_the_plugin_loads_neither_torch_nor_lightning_and_is_fast():
    """TensorBoard imports every registered plugin at start-up, in every environment that has the package."""
    code = (
        "import sys, time, json\n"
        "start = time.perf_counter()\n"
        "import lightning_rnnviz.explorer.plugin\n"
        "took = time.perf_counter() - start\n"
        "print(json.dumps([took, sorted(sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tries = []
    for _ in range(3):  # the best of three: a loaded machine slows any one start
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=60, check=True)
        took, modules = json.loads(done.stdout)
        tries.append(took)
        heavy = [m for m in modules if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning", "matplotlib")
                 or m.startswith(tuple(f"lightning_rnnviz.{p}" for p in
                                       ("probe", "render", "pipeline", "callbacks", "sinks", "cli")))]
        assert heavy == []
        assert done.stderr == ""
    assert min(tries) < 0.5, tries


# --------------------------------------------------------------------------------- a real TensorBoard
def _quiet(board: TensorBoardServer) -> list[str]:
    """Lines of TensorBoard's log that mention us or an error."""
    return [line for line in board.log_tail(400).splitlines()
            if re.search(r"rnnviz|traceback|error|warn|exception", line, re.IGNORECASE)]


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_without_data_of_ours_the_tab_is_disabled_and_quiet_until_probe_sets_arrive(tmp_path, loader):
    with TensorBoardServer(tmp_path, loader=loader) as board:
        listing = board.plugins_listing()
        assert listing[PLUGIN_NAME]["enabled"] is False
        assert listing[PLUGIN_NAME]["tab_name"] == "rnnviz"
        assert listing[PLUGIN_NAME]["loading_mechanism"] == {"type": "IFRAME",
                                                               "module_path": "/data/plugin/rnnviz/index.js"}
        assert board.get_json("/data/plugin/rnnviz/runs") == {"runs": []}
        assert _quiet(board) == []
        # a training that starts writing: the next reload serves its steps and enables the tab
        written = write_probe_sets(tmp_path, {"live": {"train": [0, 3]}})
        wait_until(lambda: board.get_json("/data/plugin/rnnviz/runs"), timeout=30,
                   until=lambda got: got == runs_json(written), what="the new steps in /runs")
        assert board.plugins_listing()[PLUGIN_NAME]["enabled"] is True
        more = write_probe_sets(tmp_path, {"live": {"train": [6]}})
        wait_until(lambda: board.get_json("/data/plugin/rnnviz/runs"), timeout=30,
                   until=lambda got: got == runs_json({**written, **more}), what="step 6 in /runs")


@pytest.fixture(scope="module", params=LOADERS)
def served(request, tmp_path_factory):
    """A TensorBoard over ``RUNS``' probe sets, once all of them are served: (board, written blobs)."""
    logdir = tmp_path_factory.mktemp(f"probe-sets-{request.param}")
    written = write_probe_sets(logdir, RUNS)
    with TensorBoardServer(logdir, loader=request.param) as board:
        expected = runs_json(written)
        wait_until(lambda: board.get_json("/data/plugin/rnnviz/runs"), timeout=60,
                   until=lambda got: got == expected, what="every probe set in /runs")
        yield board, written


@pytest.mark.slow
def test_the_tab_is_enabled_and_runs_lists_every_step_with_its_size(served):
    board, written = served
    assert board.plugins_listing()[PLUGIN_NAME]["enabled"] is True
    body, content_type = board.get("/data/plugin/rnnviz/runs")
    assert content_type.startswith("application/json")
    assert json.loads(body) == {"runs": [
        {"run": "fit/version_0/rnnviz", "tags": {
            TRAIN: {"steps": [0, 1, 2, 3, 5, 8], "sizes": [len(written["fit/version_0/rnnviz", TRAIN, s])
                                                           for s in (0, 1, 2, 3, 5, 8)]},
            VAL: {"steps": [2, 4], "sizes": [len(written["fit/version_0/rnnviz", VAL, s]) for s in (2, 4)]}}},
        {"run": "other", "tags": {VAL: {"steps": [7], "sizes": [len(written["other", VAL, 7])]}}},
    ]}
    assert _quiet(board) == []


@pytest.mark.slow
def test_probe_set_serves_the_exact_bytes_of_every_step(served):
    board, written = served
    for (run, tag, step), blob in written.items():
        body, content_type = board.get("/data/plugin/rnnviz/probe_set", {"run": run, "tag": tag, "step": step})
        assert content_type == "application/octet-stream"
        assert body == blob, (run, tag, step)


BAD = [
    ({}, 400, r"missing parameter 'run'"),
    ({"run": "other", "tag": VAL}, 400, r"missing parameter 'step'"),
    ({"run": "other", "step": 7}, 400, r"missing parameter 'tag'"),
    ({"run": "other", "tag": VAL, "step": "seven"}, 400, r"step must be an integer, got 'seven'"),
    ({"run": "other", "tag": VAL, "step": "7.0"}, 400, r"step must be an integer"),
    ({"run": "nowhere", "tag": VAL, "step": 7}, 404, r"no probe sets in run 'nowhere'"),
    ({"run": "other", "tag": TRAIN, "step": 7}, 404, r"no probe sets of tag 'rnnviz/probe_set/train' in run 'other'"),
    ({"run": "other", "tag": VAL, "step": 8}, 404, r"no probe set at step 8 of tag 'rnnviz/probe_set/val'"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("params", "status", "message"), BAD)
def test_bad_requests_answer_400_or_404_with_one_line(served, params, status, message):
    board, _ = served
    with pytest.raises(TensorBoardHTTPError) as caught:
        board.get("/data/plugin/rnnviz/probe_set", params)
    error = caught.value
    assert error.status == status
    assert error.content_type.startswith("text/plain")
    text = error.body.decode()
    assert text.endswith("\n") and text.count("\n") == 1 and "Traceback" not in text, text
    assert re.search(message, text), text


@pytest.mark.slow
def test_the_javascript_is_served_as_javascript(served):
    board, _ = served
    body, content_type = board.get("/data/plugin/rnnviz/index.js")
    assert content_type.startswith("text/javascript")
    assert body == resources.files("lightning_rnnviz.explorer").joinpath("static", "index.js").read_bytes()
    assert b"export function render(" in body and b"from './explorer.js'" in body
    # the iframe TensorBoard opens for the tab imports ./index.js relative to plugin/rnnviz/
    page, _ = board.get("/data/plugin_entry.html", {"name": PLUGIN_NAME})
    assert b'<base href="plugin/rnnviz/"' in page and b'import("./index.js")' in page
    explorer = resources.files("lightning_rnnviz.explorer").joinpath("static", "explorer.js")
    if explorer.is_file():
        body, content_type = board.get("/data/plugin/rnnviz/explorer.js")
        assert content_type.startswith("text/javascript") and body == explorer.read_bytes()
    else:  # the explorer's views are not in this tree: a 404 that says so
        with pytest.raises(TensorBoardHTTPError) as caught:
            board.get("/data/plugin/rnnviz/explorer.js")
        assert caught.value.status == 404 and b"explorer.js is not installed" in caught.value.body
