"""PNG files under a folder, scalars through a callable (e.g. another logger's ``log_metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from lightning_rnnviz.sinks.base import Picture, Sink


class FileSink(Sink):
    """Writes each picture to ``<root>/<tag without the rnnviz/ prefix>/step_<n>.png`` (texts as ``.md``).

    Tags are built from :func:`~lightning_rnnviz.sinks.safe_name` parts, and the final path is checked
    to lie inside ``root`` all the same.

    Args:
        root: the folder, e.g. ``<logger.log_dir>/rnnviz``.
        log_metrics: receives ``(metrics, step)`` for scalars; ``None`` drops scalars.
        name: how warnings name this sink (e.g. the logger's class).
    """

    def __init__(self, root: str | Path, log_metrics: Callable[[dict[str, float], int], None] | None = None,
                 name: str = "PNG files") -> None:
        self.root = Path(root).resolve()
        self.log_metrics = log_metrics
        self.name = name

    @property
    def data_dir(self) -> Path:
        return self.root

    def path_for(self, tag: str, step: int, suffix: str = ".png") -> Path:
        relative = tag.removeprefix("rnnviz/")
        path = (self.root / relative / f"step_{step}{suffix}").resolve()
        if self.root not in path.parents:
            raise ValueError(f"refusing to write {tag!r} outside {self.root}")
        return path

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def image(self, tag: str, picture: Picture, step: int) -> None:
        self._write(self.path_for(tag, step), picture.png)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.log_metrics is not None and values:
            self.log_metrics(dict(values), step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self._write(self.path_for(tag, step, ".md"), markdown.encode())
