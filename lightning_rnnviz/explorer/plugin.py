"""The ``rnnviz`` tab of TensorBoard: our plugin's server side, which serves the probe sets and the explorer.

TensorBoard finds it by the package's entry point (group ``tensorboard_plugins``) and loads it in every
TensorBoard of the environment, so it imports only TensorBoard, werkzeug and the standard library (no torch,
no Lightning, nothing of ours above :mod:`lightning_rnnviz.names`), does nothing at start-up and is listed
as disabled where no run holds data of our plugin. It reads only through the data provider, which both of
TensorBoard's loaders offer (the multiplexer is ``None`` under the Rust data server, ``--load_fast=true``).

Routes, under ``/data/plugin/rnnviz/``:

* ``/index.js``: the ES module TensorBoard imports into the tab's iframe (its ``render()`` mounts the
  explorer); ``/explorer.js``: the explorer itself (the file the HTML export inlines).
* ``/runs``: ``{"runs": [{"run": str, "tags": {tag: {"steps": [int], "sizes": [int]}}}]}``, runs sorted,
  steps ascending, ``sizes`` the blobs' bytes.
* ``/probe_set?run=R&tag=T&step=S``: one probe set's blob, ``application/octet-stream``. A missing or
  malformed parameter answers 400, an unknown run, tag or step 404, each with one line of plain text.

TensorBoard keeps a sample of each tag's steps (10 per tag of our plugin by default, always the last one);
``--samples_per_plugin=rnnviz=N`` keeps N (``0``: all), and the routes serve all that it keeps.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from tensorboard import errors
from tensorboard.plugins import base_plugin

from lightning_rnnviz.names import PLUGIN_NAME

# TensorBoard's request helpers, werkzeug, numpy and markdown (through plugin_util) are imported at the first
# request, not here: TensorBoard imports every installed plugin at start-up, and imported here they would
# cost about half a second to every Python that imports this module without serving.

_STATIC = ("index.js", "explorer.js")
_EVERY_STEP = 1_000_000  # the downsampling asked of the data provider when no --samples_per_plugin says
_INTEGER = re.compile(r"-?[0-9]+")


def _application(method):
    """``method(self, request) -> response`` as a WSGI application (werkzeug's ``Request.application``)."""

    @functools.wraps(method)
    def application(self, environ, start_response):
        from werkzeug import wrappers

        return method(self, wrappers.Request(environ))(environ, start_response)

    return application


class _BadRequest(Exception):
    """A request answered with ``code`` and one line of text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class RnnvizPlugin(base_plugin.TBPlugin):
    """TensorBoard's ``rnnviz`` tab: the probe sets that the RNNViz callback writes, in the explorer.

    Args:
        context: TensorBoard's ``TBContext``; only its ``data_provider`` and ``sampling_hints`` are used.
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider
        hint = (context.sampling_hints or {}).get(PLUGIN_NAME)
        self._downsample = hint if isinstance(hint, int) and hint > 0 else _EVERY_STEP
        # a blob's size, read once per stored datum: (run, tag, step, wall time) -> bytes
        self._sizes: dict[tuple[str, str, int, float], int] = {}

    def get_plugin_apps(self):
        return {
            "/index.js": self._serve_index,
            "/explorer.js": self._serve_explorer,
            "/runs": self._serve_runs,
            "/probe_set": self._serve_probe_set,
        }

    def is_active(self) -> bool:
        return False  # TensorBoard enables the tab when the data provider lists our plugin's data

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name=PLUGIN_NAME)

    def data_plugin_names(self):
        return (PLUGIN_NAME,)

    # ------------------------------------------------------------------------------------ static files
    @_application
    def _serve_index(self, request):
        return _static(request, "index.js")

    @_application
    def _serve_explorer(self, request):
        return _static(request, "explorer.js")

    # ------------------------------------------------------------------------------------------- data
    def _read(self, environ, runs=None, tags=None):
        """``{run: {tag: [BlobSequenceDatum, ...]}}`` of our plugin, optionally for some runs and tags."""
        if self._provider is None:
            return {}
        from tensorboard import plugin_util
        from tensorboard.data import provider

        return self._provider.read_blob_sequences(
            plugin_util.context(environ),
            experiment_id=plugin_util.experiment_id(environ),
            plugin_name=PLUGIN_NAME,
            downsample=self._downsample,
            run_tag_filter=None if runs is None else provider.RunTagFilter(runs=runs, tags=tags),
        )

    def _list(self, environ, run: str):
        """``{run: {tag: metadata}}`` of our plugin in ``run`` (empty when it holds none)."""
        if self._provider is None:
            return {}
        from tensorboard import plugin_util
        from tensorboard.data import provider

        return self._provider.list_blob_sequences(
            plugin_util.context(environ),
            experiment_id=plugin_util.experiment_id(environ),
            plugin_name=PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(runs=[run]),
        )

    def _size(self, environ, run: str, tag: str, datum) -> int:
        key = (run, tag, int(datum.step), float(datum.wall_time))
        if key not in self._sizes:
            from tensorboard import plugin_util

            blob = self._provider.read_blob(plugin_util.context(environ), blob_key=datum.values[0].blob_key)
            self._sizes[key] = len(blob)
        return self._sizes[key]

    def runs_json(self, environ) -> dict:
        """The ``/runs`` answer for the request of ``environ``."""
        found = self._read(environ)
        runs, seen = [], set()
        for run in sorted(found):
            tags = {}
            for tag in sorted(found[run]):
                data = sorted((d for d in found[run][tag] if d.values), key=lambda d: d.step)
                if not data:
                    continue
                tags[tag] = {"steps": [int(d.step) for d in data],
                             "sizes": [self._size(environ, run, tag, d) for d in data]}
                seen.update((run, tag, int(d.step), float(d.wall_time)) for d in data)
            if tags:
                runs.append({"run": run, "tags": tags})
        for key in set(self._sizes) - seen:  # data TensorBoard no longer keeps
            self._sizes.pop(key, None)  # another request may have dropped it meanwhile
        return {"runs": runs}

    @_application
    def _serve_runs(self, request):
        try:
            body = self.runs_json(request.environ)
        except errors.PublicError as error:
            return _text(request, error.http_code, _one_line(error))
        return _respond(request, body, "application/json")

    @_application
    def _serve_probe_set(self, request):
        try:
            run, tag = _parameter(request, "run"), _parameter(request, "tag")
            text = _parameter(request, "step")
            if not _INTEGER.fullmatch(text):
                raise _BadRequest(400, f"step must be an integer, got {text!r}")
            step = int(text)
            found = self._read(request.environ, runs=[run], tags=[tag])
            if tag not in found.get(run, {}):
                if run not in self._list(request.environ, run):
                    raise _BadRequest(404, f"no probe sets in run {run!r}")
                raise _BadRequest(404, f"no probe sets of tag {tag!r} in run {run!r}")
            data = [d for d in found[run][tag] if d.step == step and d.values]
            if not data:
                raise _BadRequest(404, f"no probe set at step {step} of tag {tag!r} in run {run!r}")
            from tensorboard import plugin_util

            blob = self._provider.read_blob(plugin_util.context(request.environ),
                                            blob_key=data[-1].values[0].blob_key)
        except _BadRequest as error:
            return _text(request, error.code, str(error))
        except errors.PublicError as error:
            return _text(request, error.http_code, _one_line(error))
        return _respond(request, blob, "application/octet-stream")


def _parameter(request, name: str) -> str:
    value = request.args.get(name)
    if value is None or value == "":
        raise _BadRequest(400, f"missing parameter {name!r} (ask /probe_set?run=RUN&tag=TAG&step=STEP)")
    return value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _respond(request, body, content_type: str, code: int = 200):
    from tensorboard.backend import http_util

    return http_util.Respond(request, body, content_type, code=code)


def _text(request, code: int, message: str):
    return _respond(request, message + "\n", "text/plain", code=code)


def _static(request, name: str):
    try:
        text = resources.files(__package__).joinpath("static", name).read_bytes()
    except OSError:
        return _text(request, 404, f"{name} is not installed with lightning_rnnviz")
    return _respond(request, text, "text/javascript")
