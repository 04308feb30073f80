"""One picture to draw, and the drawing itself: payload -> ``(H, W, 3)`` uint8 picture.

A job is plain data (numpy arrays, strings, numbers), so it can be drawn on the training thread or handed
to a drawing process; neither torch nor Lightning is needed to draw it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

RENDERERS = ("fast", "matplotlib")
VALIDATION_PREFIX = "rnnviz/val/"  # the tags of the validation sample's pictures


@dataclass
class Job:
    """One figure to draw: which kind, its payload (from a ``render.reduce_*``), where and when, and with
    which renderer (``"fast"``: :mod:`lightning_rnnviz.render.paint`; ``"matplotlib"``: the ``draw_*``
    figures)."""

    kind: str
    payload: Mapping[str, Any]
    tag: str
    step: int
    renderer: str = "fast"

    @property
    def validation(self) -> bool:
        """Whether the picture shows the validation sample (its tag is under ``rnnviz/val/``): its title
        says ``validation at train step N``."""
        return self.tag.startswith(VALIDATION_PREFIX)


def draw(job: Job) -> np.ndarray:
    """Draw a job as an ``(H, W, 3)`` uint8 picture.

    Raises:
        ValueError: an unknown renderer.
    """
    p = job.payload
    if job.renderer == "fast":
        from lightning_rnnviz.render import paint

        if job.kind == "grad_decay":
            return paint.paint_grad_decay(p["history"], p["name"], p["layer_labels"], step=job.step,
                                          horizons=p.get("horizons"), notes=p.get("notes", ()),
                                          alignment=p.get("alignment", "start"))
        return paint.PAINTERS[job.kind](p, step=job.step, validation=job.validation)
    if job.renderer != "matplotlib":
        raise ValueError(f"unknown renderer {job.renderer!r}; use one of {RENDERERS}")
    import lightning_rnnviz.render as render

    drawers = {
        "hidden": render.draw_hidden,
        "gates": render.draw_gates,
        "grad_norm": render.draw_grad_norm,
        "attention": render.draw_attention,
    }
    if job.kind == "grad_decay":
        figure = render.draw_grad_decay(p["history"], p["name"], p["layer_labels"], step=job.step,
                                        horizons=p.get("horizons"), notes=p.get("notes", ()),
                                        alignment=p.get("alignment", "start"))
    else:
        figure = drawers[job.kind](p, step=job.step, validation=job.validation)
    return render.figure_to_rgb(figure)
