"""How tall text is where a picture is seen: the heights of rendered glyphs in a PNG scaled to a card's width.

TensorBoard's Images and Time Series dashboards show a picture about 350 px wide (``CARD_WIDTH``); a
picture drawn wider is scaled down, its type with it. :func:`ink_heights` scales the picture as a browser
would (Lanczos), then, inside each text box (given in the picture's own pixels, one line of text each),
measures the extent of the rows (columns for text reading upwards) that hold ink: what the eye gets, not a
font constant. Text without a capital, digit or ascender is left out (its ink is only x-height tall).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

CARD_WIDTH = 350  # px: a picture's width in TensorBoard's image cards (1600x1200 window)
READABLE_PX = 7.0  # px: least height of a capital or digit at card width (TensorBoard's own card text: ~9)
INK_DROP = 70  # a pixel is ink when it is this much darker (0-255 luminance) than the box's lightest pixel


@dataclass(frozen=True)
class TextBox:
    """One line of text as it was drawn: its content, and its box ``(x0, y0, x1, y1)`` in picture pixels."""

    text: str
    box: tuple[float, float, float, float]
    rotated: bool = False  # reads upwards (a y-axis title)


def _tall(text: str) -> bool:
    return any(ch.isdigit() or ch.isupper() or ch in "bdfhklt|()[]/" for ch in text)


def scaled(rgb: np.ndarray, width: int = CARD_WIDTH) -> tuple[np.ndarray, float]:
    """``rgb`` ``(H, W, 3)`` scaled to ``width`` px wide (never up), as luminance, and the factor used."""
    factor = min(1.0, width / rgb.shape[1])
    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]).astype(np.uint8)).convert("L")
    if factor < 1.0:
        size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float64), factor


def ink_heights(rgb: np.ndarray, boxes: Sequence[TextBox], width: int = CARD_WIDTH) -> list[tuple[TextBox, float]]:
    """Each tall text box of ``rgb`` with the height (px) of its ink once the picture is ``width`` wide."""
    grey, factor = scaled(rgb, width)
    found = []
    for entry in boxes:
        if not entry.text.strip() or not _tall(entry.text):
            continue
        x0, y0, x1, y1 = (v * factor for v in entry.box)
        xa, ya = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        xb, yb = min(grey.shape[1], int(np.ceil(x1))), min(grey.shape[0], int(np.ceil(y1)))
        patch = grey[ya:yb, xa:xb]
        if patch.size == 0:
            found.append((entry, 0.0))
            continue
        ink = patch < patch.max() - INK_DROP
        lines = ink.any(axis=0) if entry.rotated else ink.any(axis=1)
        where = np.flatnonzero(lines)
        found.append((entry, float(where[-1] - where[0] + 1) if where.size else 0.0))
    return found


def too_small(rgb: np.ndarray, boxes: Sequence[TextBox], least: float = READABLE_PX,
              width: int = CARD_WIDTH) -> list[str]:
    """``"text: N px"`` for every tall text box whose ink is under ``least`` px at ``width``."""
    return [f"{entry.text!r}: {height:.1f} px" for entry, height in ink_heights(rgb, boxes, width) if height < least]
