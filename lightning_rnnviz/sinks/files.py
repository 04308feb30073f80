"""PNG files under a folder, scalars through a callable (e.g. another logger's ``log_metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lightning_rnnviz.sinks.base import Sink
from lightning_rnnviz.sinks.png import encode_png


class FileSink(Sink):
    """Writes each image to ``<root>/<tag without the rnnviz/ prefix>/step_<n>.png``.

    Tags are built from :func:`~lightning_rnnviz.sinks.safe_name` parts, and the final path is checked
    to lie inside ``root`` all the same.

    Args:
        root: the folder, e.g. ``<logger.log_dir>/rnnviz``.
        log_metrics: receives ``(metrics, step)`` for scalars; ``None`` drops scalars.
    """

    def __init__(self, root: str | Path, log_metrics: Callable[[dict[str, float], int], None] | None = None) -> None:
        self.root = Path(root).resolve()
        self.log_metrics = log_metrics

    def path_for(self, tag: str, step: int) -> Path:
        relative = tag.removeprefix("rnnviz/")
        path = (self.root / relative / f"step_{step}.png").resolve()
        if self.root not in path.parents:
            raise ValueError(f"refusing to write {tag!r} outside {self.root}")
        return path

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        path = self.path_for(tag, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(rgb))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.log_metrics is not None and values:
            self.log_metrics(dict(values), step)
