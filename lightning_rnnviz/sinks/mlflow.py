"""MLflow: pictures, scalars and findings through a Lightning ``MLFlowLogger``.

Works with the ``MLFlowLogger`` of either Lightning namespace, duck-typed: the sink uses the logger's
``experiment`` (an ``mlflow.MlflowClient``), ``run_id`` and ``log_metrics(metrics, step)``.

- Scalars go through ``logger.log_metrics(values, step)``, as Lightning logs the user's ``self.log``
  values: MLflow metrics keep their step, so ours line up with the user's in every chart. A step's
  scalars are sent as one ``log_batch`` (in :meth:`MLflowSink.flush`, or when a call for another step
  arrives).
- Pictures go to the client's ``log_image(run_id, image, key=tag, step=step)`` where the installed MLflow
  has it (2.12 and later; feature-detected once per sink from its signature): MLflow's run page then
  shows them by key with a step slider. MLflow 3.11+ stores them as ``images/<key, '/' as
  '~'>+step+<n>+...`` (a full-size PNG it encodes itself, about 20 ms for an 800x600 picture, and a
  small WebP). MLflow 2.12 to 3.10 wrote a key's ``/`` as ``#``, which its own artifact download (API
  and UI) then refuses as an unsafe path, so there the key's ``/`` become ``-``
  (``rnnviz-hidden-<module>``). Older MLflow gets our own PNG bytes, unchanged, as the artifact
  ``<tag>/step_<n>.png``.
- Text (markdown findings) is the artifact ``<tag>/step_<n>.md`` (``log_text``).
- With the recording worker, pictures, texts and documents are written by the worker, beside training
  (:meth:`MLflowSink.writes_beside`): ``log_image`` encodes a PNG and a WebP itself, which cost the
  training thread 50 ms a delivery on ``bench_overhead.py``'s fast-step (now under 0.1 ms; 2026-12-08,
  2 vCPUs, SQLite store). The worker writes them without the output's lock, so the training thread never
  waits for them. The client is MLflow's ``MlflowClient``, which MLflow's own asynchronous logging
  also calls from other threads. Scalars stay on the training thread: they go through the user's logger.
- Histograms: MLflow has no histogram view, so none are sent (``wants_histograms`` is False).

The sink never ends the run: that stays with the logger (``finalize``).
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from lightning_rnnviz.sinks.base import Histogram, Picture, Sink, json_text

_MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def slashes_survive_image_keys() -> bool:
    """Whether the installed MLflow's ``log_image(key=)`` keeps a ``/`` readable (3.11+ writes it as
    ``~``; 2.12 to 3.10 wrote ``#``, which MLflow's artifact download rejects)."""
    try:
        import mlflow

        major, minor = (int(part) for part in mlflow.__version__.split(".")[:2])
    except (ImportError, AttributeError, ValueError):
        return True
    return (major, minor) >= (3, 11)


def has_image_keys(client: Any) -> bool:
    """Whether ``client.log_image`` takes ``key`` and ``step`` (MLflow 2.12+), from its signature."""
    try:
        parameters = inspect.signature(client.log_image).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "key" in parameters and "step" in parameters


class MLflowSink(Sink):
    """Pictures, scalars and text of each recording step into the logger's MLflow run.

    Args:
        logger: a Lightning ``MLFlowLogger`` (either namespace), or anything with ``experiment`` (an
            ``MlflowClient``), ``run_id`` and ``log_metrics(metrics, step)``.
        image_keys: use ``log_image(key=, step=)``; ``None`` uses it where the client has it.
    """

    name = "mlflow"
    wants_histograms = False
    _BESIDE = frozenset({"picture", "text", "document"})  # artifacts through the client, not the logger

    def writes_beside(self, kind: str) -> bool:
        """Pictures, texts and documents (artifacts written through the client); not scalars, which go
        through the user's logger."""
        return kind in self._BESIDE

    def __init__(self, logger: Any, image_keys: bool | None = None) -> None:
        self.logger = logger
        self.client = logger.experiment  # creates the run, as Lightning would on its first log
        self.run_id = logger.run_id
        self.image_keys = has_image_keys(self.client) if image_keys is None else image_keys
        self._slashes = slashes_survive_image_keys()
        prefix = getattr(logger, "_prefix", "") or ""
        self._prefix = f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""
        self._step: int | None = None
        self._scalars: dict[str, float] = {}
        self._tmpdir: str | None = None

    def _at(self, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = int(step)

    def _tmp(self) -> str:
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="rnnviz-mlflow-")
        return self._tmpdir

    def image_key(self, tag: str) -> str:
        """The image key ``tag`` is logged under with ``log_image(key=)``."""
        key = self._prefix + tag
        return key if self._slashes else key.replace("/", "-")

    def image(self, tag: str, picture: Picture, step: int) -> None:
        if self.run_id is None:  # not rank zero: Lightning gave a dummy experiment
            return
        key = self._prefix + tag
        if self.image_keys:
            self.client.log_image(self.run_id, picture.rgb(), key=self.image_key(tag), step=int(step))
            return
        # Older MLflow: our PNG as it is (log_image(artifact_file=) would re-encode it).
        folder = os.path.join(self._tmp(), "image")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{int(step)}.png")
        with open(path, "wb") as file:
            file.write(picture.png)
        try:
            self.client.log_artifact(self.run_id, path, artifact_path=key)
        finally:
            os.remove(path)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if not values:
            return
        self._at(step)
        self._scalars.update((tag, float(value)) for tag, value in values.items())

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        """MLflow has nothing to show a histogram in; nothing is sent."""

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.run_id is None:
            return
        self.client.log_text(self.run_id, markdown, f"{self._prefix}{tag}/step_{int(step)}.md")

    def document(self, name: str, data: Mapping[str, Any] | str) -> None:
        """The artifact ``rnnviz/<name>`` (replaced each time)."""
        if self.run_id is not None:
            self.client.log_text(self.run_id, json_text(data), f"{self._prefix}rnnviz/{name}")

    def flush(self) -> None:
        """Send the step's scalars as one batch (the logger applies its prefix, as for the user's)."""
        if self._step is None or not self._scalars:
            return
        scalars, self._scalars = self._scalars, {}
        items = list(scalars.items())
        for start in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.logger.log_metrics(dict(items[start : start + _MAX_METRICS_PER_BATCH]), step=self._step)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None
