"""A small raster canvas for the ``"fast"`` renderer: numpy colour tables, Pillow text and lines, no matplotlib.

A matplotlib figure costs 70-300 ms of CPU; the pictures this package draws are heatmaps, a few curves and
some text, which numpy and Pillow paint in a few milliseconds. Coordinates are final pixels with the
origin at the top left. Curves are smoothed by painting them at twice the size and halving that back:
inside ``with canvas.fine(box):`` only the region ``box`` is so painted (text, frames, ticks and grid
lines stay sharp at the final size, and cost a quarter of the pixels); a canvas made with ``scale=2``
paints everything at twice the size.

Colour maps are built here from the OKLab colour space (Ottosson, 2020), so that lightness changes evenly
along them: ``sequential`` runs from dark blue-violet through teal to yellow, ``diverging`` from blue
through near-white to red. Cells holding NaN or Inf are painted :data:`BAD_RGB` (magenta, absent from
both maps).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BAD_RGB = (255, 0, 255)
TEXT_RGB = (20, 20, 20)
MUTED_RGB = (90, 90, 90)
FRAME_RGB = (60, 60, 60)
GRID_RGB = (229, 229, 229)
# Line colours for layers, gates and heads; chosen to stay apart for common colour-vision deficiencies.
PALETTE = (
    (31, 104, 178),
    (230, 120, 20),
    (40, 150, 70),
    (200, 40, 45),
    (130, 90, 180),
    (130, 80, 60),
    (20, 170, 190),
    (220, 100, 180),
    (120, 120, 120),
    (180, 170, 30),
)

# Dash lengths in pixels of the line styles (matplotlib's names) that `Canvas.line` and `legend` draw.
DASHES = {"-": 0.0, "--": 5.0, ":": 2.5, "-.": 10.0}

# Type sizes in pixels. The pictures are seen in TensorBoard's image cards, about 350 px wide: a picture
# 560 px wide is shown at 0.625 of its size, and a 16 px digit (11.7 px tall in the PNG) keeps 7-8 px there.
TITLE_SIZE = 21
PANEL_TITLE_SIZE = 18
LABEL_SIZE = 17
TICK_SIZE = 17
NOTE_SIZE = 16  # the lines under a title (context, approximation notes)
TICK_PX = 5  # length of a tick mark


# --- where the text went (for tests) ----------------------------------------------------------------
class TextBox(NamedTuple):
    """One line of text as :meth:`Canvas.text` wrote it: its content, its box ``(x0, y0, x1, y1)`` in final
    pixels (the extent of the glyphs' mask), and whether it reads upwards."""

    text: str
    box: tuple[float, float, float, float]
    rotated: bool = False


_recording: list[TextBox] | None = None


@contextlib.contextmanager
def recording_text() -> Iterator[list[TextBox]]:
    """Inside the block, every :meth:`Canvas.text` call (on any canvas, in any thread) appends its
    :class:`TextBox` to the list it yields; outside, nothing is kept and writing costs nothing more. For
    tests that measure how tall the text of a picture is where it is seen."""
    global _recording
    outer, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = outer


# --- colour ------------------------------------------------------------------------------------------
def _oklab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """``(n, 3)`` OKLab -> ``(n, 3)`` sRGB in ``[0, 1]`` (clipped to the gamut)."""
    to_lms = np.array(
        [[1.0, 0.3963377774, 0.2158037573], [1.0, -0.1055613458, -0.0638541728], [1.0, -0.0894841775, -1.2914855480]]
    )
    to_linear = np.array(
        [
            [4.0767416621, -3.3077115913, 0.2309699292],
            [-1.2684380046, 2.6097574011, -0.3413193965],
            [-0.0041960863, -0.7034186147, 1.7076147010],
        ]
    )
    linear = np.clip((lab @ to_lms.T) ** 3 @ to_linear.T, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _lch_ramp(lightness: np.ndarray, chroma: np.ndarray, hue_deg: np.ndarray) -> np.ndarray:
    hue = np.deg2rad(hue_deg)
    lab = np.column_stack((lightness, chroma * np.cos(hue), chroma * np.sin(hue)))
    return np.round(_oklab_to_srgb(lab) * 255).astype(np.uint8)


@functools.cache
def colour_table(name: str) -> np.ndarray:
    """``(256, 3)`` uint8 table of colour map ``name``: ``"sequential"``, ``"diverging"``, or ``"epochs"``
    (from light to dark: the latest epoch of a ``grad_decay`` picture darkest)."""
    s = np.linspace(0.0, 1.0, 256)
    if name == "sequential":
        return _lch_ramp(0.30 + 0.63 * s, 0.10 + 0.07 * s, 290.0 - 185.0 * s)
    if name == "epochs":
        # light (early epochs) to dark (late ones): orange-yellow through red to a dark violet, the first
        # still visible on white
        return _lch_ramp(0.86 - 0.62 * s, 0.13 + 0.05 * np.sin(np.pi * s), 85.0 - 215.0 * s)
    if name == "diverging":
        side = np.abs(2 * s - 1)  # 0 in the middle, 1 at both ends
        lightness = 0.97 - 0.50 * side**1.1
        chroma = 0.19 * np.sin(np.pi / 2 * np.minimum(side * 1.15, 1.0))
        hue = np.where(s < 0.5, 255.0, 28.0)
        return _lch_ramp(lightness, chroma, hue)
    raise ValueError(f"Unknown colour map {name!r}; use 'sequential', 'diverging' or 'epochs'.")


def colourise(values: np.ndarray, name: str, vmin: float, vmax: float) -> np.ndarray:
    """Map ``values`` linearly from ``[vmin, vmax]`` onto colour map ``name``; NaN/Inf become :data:`BAD_RGB`."""
    values = np.asarray(values, dtype=np.float32)
    span = vmax - vmin if vmax > vmin else 1.0
    with np.errstate(invalid="ignore"):
        index = np.clip((values - vmin) * (255.0 / span), 0, 255)
    bad = ~np.isfinite(values)
    index = np.where(bad, 0, index).astype(np.uint8)
    rgb = colour_table(name)[index]
    rgb[bad] = BAD_RGB
    return rgb


def palette(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def resample(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Resize the last two axes of ``values`` to ``(rows, columns)`` pixels.

    Enlarging repeats cells (each cell a sharp block); shrinking averages the cells that fall in a pixel,
    so no cell is silently dropped. NaN/Inf in any merged cell stay NaN/Inf.
    """
    for axis, size in ((-2, rows), (-1, columns)):
        length = values.shape[axis]
        if length == size or length == 0:
            continue
        if length < size:
            index = (np.arange(size) * length) // size
            values = np.take(values, index, axis=axis)
        else:
            starts = (np.arange(size) * length) // size
            counts = np.diff(np.append(starts, length)).astype(np.float32)
            shape = [1] * values.ndim
            shape[axis] = size
            with np.errstate(invalid="ignore", over="ignore"):
                values = np.add.reduceat(values.astype(np.float32), starts, axis=axis) / counts.reshape(shape)
    return values


# --- ticks -------------------------------------------------------------------------------------------
def nice_ticks(low: float, high: float, most: int = 6, integer: bool = False) -> np.ndarray:
    """Round tick values inside ``[low, high]``, at most ``most`` of them, on steps of 1, 2, 2.5 or 5 x 10^k."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return np.array([low]) if math.isfinite(low) else np.array([])
    raw = (high - low) / max(most - 1, 1)
    exponent = math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        step = multiple * 10.0**exponent
        if integer and step < 1:
            continue
        if integer and step != int(step):
            continue
        ticks = np.arange(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1) * step
        if len(ticks) <= most:
            return ticks
    return np.array([low, high])


def log_ticks(low: float, high: float, most: int = 8) -> np.ndarray:
    """Powers of ten inside ``[low, high]``, every k-th decade so that at most ``most`` remain."""
    first, last = math.ceil(math.log10(low) - 1e-9), math.floor(math.log10(high) + 1e-9)
    if last < first:
        return np.array([])
    every = max(1, math.ceil((last - first + 1) / most))
    return 10.0 ** np.arange(first, last + 1, every)


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:g}"


def format_log_tick(value: float) -> str:
    exponent = round(math.log10(value))
    return "1" if exponent == 0 else ("10" if exponent == 1 else f"1e{exponent}")


# --- canvas ------------------------------------------------------------------------------------------
@functools.cache
def _font_file() -> str | None:
    """DejaVu Sans as matplotlib ships it (the face of matplotlib's figures), found without importing
    matplotlib; ``None`` when it is not there."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.exists(path):
            return path
    return None


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = _font_file()
    try:
        if path is not None:
            return ImageFont.truetype(path, size)
        return ImageFont.load_default(size=size)  # Pillow's own face (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):  # no FreeType: Pillow's bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _text_length(text: str, size: int) -> float:
    """The advance width of ``text`` at ``size`` px (cached: layouts measure the same labels every time)."""
    return _font(size).getlength(text)


_CACHED_TEXT = 120  # longest text kept in the cache (axis titles, legends, headings, the lines under a
# title; a title's step is written apart, uncached)


@functools.lru_cache(maxsize=2048)
def _text_mask(text: str, size: int, anchor: str, rotate: bool) -> tuple[Image.Image, tuple[float, float]]:
    """The coverage mask of ``text`` at ``size`` px and its offset from the anchor point (cached: tick
    labels and axis titles repeat across pictures)."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text, anchor=anchor if not rotate else "ls")
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255, anchor=anchor if not rotate else "ls")
    if not rotate:
        return mask, (left, top)
    mask = mask.transpose(Image.Transpose.ROTATE_90)
    w, h = mask.size  # w: text height, h: text length
    # along the text (now vertical): l = starts at y and goes up, m = centred, r = ends at y
    oy = {"l": -h, "m": -h / 2, "r": 0.0}[anchor[0]]
    # across the text (now horizontal): a/t = top of the letters at x, m = centred, s/b/d = bottom at x
    ox = {"a": 0.0, "t": 0.0, "m": -w / 2, "s": -w, "b": -w, "d": -w}[anchor[1]]
    return mask, (ox, oy)


FINE = 2  # how many times the size `Canvas.fine` paints at


@functools.cache
def _stamp(r: int, shape: str) -> tuple[np.ndarray, np.ndarray]:
    """The pixel offsets ``(dx, dy)`` of a marker of radius ``r`` (``"dot"``, ``"x"``, ``"v"``, else a square)."""
    offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
    if shape == "dot":
        offsets = [(dx, dy) for dx, dy in offsets if dx * dx + dy * dy <= r * r + r]
    elif shape == "x":
        offsets = [(dx, dy) for dx, dy in offsets if abs(dx) == abs(dy)]
        offsets += [(dx + 1, dy) for dx, dy in offsets]
    elif shape == "v":
        offsets = [(dx, dy) for dx, dy in offsets if abs(dx) <= (r - dy) / 2 + 0.5]
    dx, dy = np.array(offsets, dtype=np.int64).T
    return dx, dy


class Canvas:
    """An RGB picture of ``width x height`` final pixels, painted at ``scale`` times that size."""

    def __init__(self, width: int, height: int, scale: int = 1) -> None:
        self.width, self.height, self.scale = int(width), int(height), int(scale)
        self.image = Image.new("RGB", (self.width * self.scale, self.height * self.scale), (255, 255, 255))
        self.draw = ImageDraw.Draw(self.image)
        self.origin = (0, 0)  # the final pixel at the top left of `image` (not (0, 0) inside `fine`)

    def _x(self, value: float | np.ndarray) -> float | np.ndarray:
        return (value - self.origin[0]) * self.scale

    def _y(self, value: float | np.ndarray) -> float | np.ndarray:
        return (value - self.origin[1]) * self.scale

    @contextlib.contextmanager
    def fine(self, box: tuple[float, float, float, float], margin: float = 6) -> Iterator[None]:
        """Inside the block, paint the region ``box`` (final pixels, grown by ``margin`` for line ends and
        markers, cut at the canvas) at :data:`FINE` times the size; it is halved back into the picture at
        the end of the block. What was painted there before is kept as it was; what is drawn outside the
        region is cut off. On a canvas already painted at ``scale > 1`` it changes nothing."""
        if self.scale != 1:
            yield
            return
        x0, y0 = max(0, math.floor(box[0] - margin)), max(0, math.floor(box[1] - margin))
        x1, y1 = min(self.width, math.ceil(box[2] + margin)), min(self.height, math.ceil(box[3] + margin))
        if x1 <= x0 or y1 <= y0:
            yield
            return
        region = self.image.crop((x0, y0, x1, y1)).resize(((x1 - x0) * FINE, (y1 - y0) * FINE), Image.Resampling.NEAREST)
        image, draw = self.image, self.draw
        self.image, self.draw, self.scale, self.origin = region, ImageDraw.Draw(region), FINE, (x0, y0)
        try:
            yield
        finally:
            self.image, self.draw, self.scale, self.origin = image, draw, 1, (0, 0)
            image.paste(region.reduce(FINE), (x0, y0))

    def font(self, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        return _font(round(size * self.scale))

    def text_width(self, text: str, size: int) -> float:
        return _text_length(text, round(size * self.scale)) / self.scale

    def fit_text(self, text: str, size: int, width: float) -> str:
        """``text`` cut (with ``..``) to at most ``width`` pixels."""
        if self.text_width(text, size) <= width:
            return text
        while len(text) > 1 and self.text_width(text + "..", size) > width:
            text = text[:-1]
        return text + ".."

    def text(
        self,
        xy: tuple[float, float],
        text: str,
        size: int = TICK_SIZE,
        anchor: str = "la",
        fill: tuple[int, int, int] = TEXT_RGB,
        rotate: bool = False,
        cache: bool = True,
    ) -> None:
        """Write ``text`` at ``xy`` with a Pillow ``anchor`` (two letters: along, across the text).

        ``rotate`` turns the text 90 degrees anticlockwise (reading upwards); the anchor keeps its meaning
        relative to the text: ``"rm"`` ends the text at ``xy``, so it hangs below a tick; ``"mb"`` centres
        it with its baseline side at ``xy``. ``cache=False`` for a text that changes from picture to
        picture (a step number), which would only fill the cache.
        """
        if not text:
            return
        # Tick labels and axis titles repeat from picture to picture and are cached; long texts are not
        # (figure titles carry the step: `title_block` writes them in pieces, the step uncached).
        render = _text_mask if cache and len(text) <= _CACHED_TEXT else _text_mask.__wrapped__
        mask, (dx, dy) = render(text, round(size * self.scale), anchor, rotate)
        x, y = round(self._x(xy[0]) + dx), round(self._y(xy[1]) + dy)
        self.image.paste(fill, (x, y, x + mask.width, y + mask.height), mask)
        if _recording is not None:
            s, (ox, oy) = self.scale, self.origin
            _recording.append(TextBox(text, (x / s + ox, y / s + oy, (x + mask.width) / s + ox,
                                             (y + mask.height) / s + oy), rotate))

    def line(
        self,
        points: Sequence[tuple[float, float]] | np.ndarray,
        fill: tuple[int, int, int],
        width: float = 1.0,
        dash: float = 0.0,
        round_joints: bool = True,
    ) -> None:
        """A polyline through ``points``; ``dash`` > 0 draws dashes and gaps of that many pixels.
        ``round_joints=False`` leaves the corners square-cut: Pillow rounds them one vertex at a time, in
        Python, which costs more than the line itself where many wide lines are drawn."""
        points = (np.asarray(points, dtype=np.float64).reshape(-1, 2) - self.origin) * self.scale
        if len(points) < 2:
            return
        stroke = max(1, round(width * self.scale))
        if dash <= 0:
            self.draw.line(points.ravel().tolist(), fill=fill, width=stroke, joint="curve" if round_joints else None)
            return
        period = dash * self.scale
        lengths = np.hypot(*np.diff(points, axis=0).T)
        along = np.concatenate(([0.0], np.cumsum(lengths)))
        total = along[-1]
        if len(points) == 2:  # a straight dashed line (a level, a boundary): every dash at once
            starts = np.arange(0.0, total, 2 * period)
            ends = np.minimum(starts + period, total)
            xs = np.interp(np.column_stack((starts, ends)), along, points[:, 0])
            ys = np.interp(np.column_stack((starts, ends)), along, points[:, 1])
            for (xa, xb), (ya, yb) in zip(xs.tolist(), ys.tolist()):
                self.draw.line((xa, ya, xb, yb), fill=fill, width=stroke)
            return
        start = 0.0
        while start < total:
            stop = min(start + period, total)
            keep = (along > start) & (along < stop)
            xs = np.interp(np.concatenate(([start], along[keep], [stop])), along, points[:, 0])
            ys = np.interp(np.concatenate(([start], along[keep], [stop])), along, points[:, 1])
            self.draw.line(list(zip(xs, ys)), fill=fill, width=stroke, joint="curve")
            start += 2 * period

    def rectangle(
        self,
        box: tuple[float, float, float, float],
        outline: tuple[int, int, int] | None = None,
        fill: tuple[int, int, int] | None = None,
        width: float = 1.0,
    ) -> None:
        x0, y0, x1, y1 = self._x(box[0]), self._y(box[1]), self._x(box[2]), self._y(box[3])
        self.draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=outline, fill=fill, width=max(1, round(width * self.scale)))

    def polygon(self, points: Sequence[tuple[float, float]], fill: tuple[int, int, int]) -> None:
        self.draw.polygon([(self._x(x), self._y(y)) for x, y in points], fill=fill)

    def markers(
        self, xs: np.ndarray, ys: np.ndarray, fill: tuple[int, int, int], radius: float = 1.5, alpha: float = 1.0,
        shape: str = "dot",
    ) -> None:
        """Small markers at pixel positions ``(xs, ys)``: ``"dot"``, ``"x"`` or ``"v"`` (a down triangle),
        blended with ``alpha``; stamped with numpy, so thousands cost about as much as one."""
        self.scatter([(xs, ys, fill)], radius, alpha, shape)

    def scatter(
        self, groups: Sequence[tuple[np.ndarray, np.ndarray, tuple[int, int, int]]], radius: float = 1.5,
        alpha: float = 1.0, shape: str = "dot",
    ) -> None:
        """:meth:`markers` for several groups ``(xs, ys, fill)``, stamped in order (a later group over an
        earlier one) on one copy of the region they cover."""
        groups = [(self._x(np.asarray(xs, dtype=np.float64)).ravel(), self._y(np.asarray(ys, dtype=np.float64)).ravel(),
                   fill) for xs, ys, fill in groups]
        groups = [g for g in groups if g[0].size]
        r = max(1, round(radius * self.scale))
        if not groups:
            return
        centres = [(np.round(xs).astype(np.int64), np.round(ys).astype(np.int64), fill) for xs, ys, fill in groups]
        # work on the points' bounding box only: scatter panels are small, the canvas is not
        x0 = max(min(int(cx.min()) for cx, _, _ in centres) - r - 1, 0)
        y0 = max(min(int(cy.min()) for _, cy, _ in centres) - r, 0)
        x1 = min(max(int(cx.max()) for cx, _, _ in centres) + r + 2, self.image.width)
        y1 = min(max(int(cy.max()) for _, cy, _ in centres) + r + 1, self.image.height)
        if x1 <= x0 or y1 <= y0:
            return
        region = np.array(self.image.crop((x0, y0, x1, y1)))
        height, width = region.shape[:2]
        dx, dy = _stamp(r, shape)
        for cx, cy, fill in centres:
            px = (cx[:, None] + dx[None, :] - x0).ravel()
            py = (cy[:, None] + dy[None, :] - y0).ravel()
            inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
            hit = np.zeros((height, width), dtype=bool)
            hit[py[inside], px[inside]] = True
            colour = np.asarray(fill, dtype=np.float32)
            region[hit] = np.round(region[hit].astype(np.float32) * (1 - alpha) + colour * alpha).astype(np.uint8)
        self.image.paste(Image.fromarray(region), (x0, y0))

    def paste(self, box: tuple[float, float, float, float], rgb: np.ndarray) -> None:
        """Fill pixel box ``(x0, y0, x1, y1)`` with the ``(rows, columns, 3)`` cells ``rgb`` (sharp blocks)."""
        x0, y0, x1, y1 = round(self._x(box[0])), round(self._y(box[1])), round(self._x(box[2])), round(self._y(box[3]))
        if x1 <= x0 or y1 <= y0 or rgb.size == 0:
            return
        cells = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
        self.image.paste(cells.resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST), (x0, y0))

    def to_array(self) -> np.ndarray:
        """The picture as a ``(height, width, 3)`` uint8 array owned by the caller."""
        image = self.image if self.scale == 1 else self.image.reduce(self.scale)
        return np.array(image, dtype=np.uint8)


class Panel:
    """A plot area ``box = (x0, y0, x1, y1)`` on ``canvas`` with data limits ``xlim``/``ylim``.

    ``ylog`` makes the y axis logarithmic; ``yflip`` puts ``ylim[0]`` at the top (image rows).
    """

    def __init__(
        self,
        canvas: Canvas,
        box: tuple[float, float, float, float],
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        ylog: bool = False,
        yflip: bool = False,
    ) -> None:
        self.canvas, self.box = canvas, tuple(float(v) for v in box)
        self.xlim, self.ylim, self.ylog, self.yflip = xlim, ylim, ylog, yflip

    def x(self, values: np.ndarray | float) -> np.ndarray:
        x0, _, x1, _ = self.box
        lo, hi = self.xlim
        return x0 + (np.asarray(values, dtype=np.float64) - lo) / (hi - lo or 1.0) * (x1 - x0)

    def y(self, values: np.ndarray | float) -> np.ndarray:
        _, y0, _, y1 = self.box
        lo, hi = self.ylim
        values = np.asarray(values, dtype=np.float64)
        if self.ylog:
            with np.errstate(divide="ignore", invalid="ignore"):
                values, lo, hi = np.log10(values), math.log10(lo), math.log10(hi)
        fraction = (values - lo) / (hi - lo or 1.0)
        return y0 + fraction * (y1 - y0) if self.yflip else y1 - fraction * (y1 - y0)

    def frame(self) -> None:
        self.canvas.rectangle(self.box, outline=FRAME_RGB)

    def image(self, rgb: np.ndarray) -> None:
        self.canvas.paste(self.box, rgb)

    def heatmap(self, values: np.ndarray, name: str, vmin: float, vmax: float) -> None:
        """Colour the ``(rows, columns)`` cells ``values`` over the whole panel. Cells become sharp blocks;
        where there are more cells than pixels they are first averaged (:func:`resample`), so none is
        dropped."""
        x0, y0, x1, y1 = self.box
        rows, columns = values.shape
        height, width = round(y1 - y0), round(x1 - x0)
        if rows > height or columns > width:
            values = resample(values, min(rows, height), min(columns, width))
        self.image(colourise(values, name, vmin, vmax))

    def hgrid(self, values: np.ndarray) -> None:
        x0, _, x1, _ = self.box
        for y in self.y(values):
            self.canvas.line([(x0, y), (x1, y)], GRID_RGB)

    def xticks(self, values: np.ndarray, labels: Sequence[str] | None = None, rotate: bool = False,
               size: int = TICK_SIZE) -> None:
        _, _, _, y1 = self.box
        labels = [format_tick(v) for v in values] if labels is None else labels
        for x, label in zip(self.x(values), labels):
            self.canvas.line([(x, y1), (x, y1 + TICK_PX)], FRAME_RGB)
            if rotate:
                self.canvas.text((x, y1 + TICK_PX + 3), label, size, anchor="rm", rotate=True)
            else:
                self.canvas.text((x, y1 + TICK_PX + 3), label, size, anchor="ma")

    def yticks(self, values: np.ndarray, labels: Sequence[str] | None = None, size: int = TICK_SIZE,
               right: bool = False) -> None:
        x0, _, x1, _ = self.box
        labels = [format_tick(v) for v in values] if labels is None else labels
        for y, label in zip(self.y(values), labels):
            if right:
                self.canvas.line([(x1, y), (x1 + TICK_PX, y)], FRAME_RGB)
                self.canvas.text((x1 + TICK_PX + 3, y), label, size, anchor="lm")
            else:
                self.canvas.line([(x0 - TICK_PX, y), (x0, y)], FRAME_RGB)
                self.canvas.text((x0 - TICK_PX - 3, y), label, size, anchor="rm")

    def title(self, text: str, right: str = "") -> None:
        """``text`` over the panel's left edge; ``right`` (muted) over its right edge where both fit, else
        ``right`` is left out."""
        x0, y0, x1, _ = self.box
        room = x1 - x0
        if right:
            needed = self.canvas.text_width(text, PANEL_TITLE_SIZE) + self.canvas.text_width(right, TICK_SIZE) + 12
            if needed <= room:
                self.canvas.text((x1, y0 - 5), right, TICK_SIZE, anchor="rd", fill=MUTED_RGB)
                room -= self.canvas.text_width(right, TICK_SIZE) + 12
        self.canvas.text((x0, y0 - 5), self.canvas.fit_text(text, PANEL_TITLE_SIZE, room), PANEL_TITLE_SIZE,
                         anchor="ld")

    def xlabel(self, text: str, offset: float = 0.0) -> None:
        """The axis title under the panel, ``offset`` pixels below its bottom edge (default: under one row
        of tick labels)."""
        x0, _, x1, y1 = self.box
        offset = offset or TICK_PX + TICK_SIZE + 8
        self.canvas.text(((x0 + x1) / 2, y1 + offset), self.canvas.fit_text(text, LABEL_SIZE, self.canvas.width - 8),
                         LABEL_SIZE, anchor="ma")

    def ylabel(self, text: str, offset: float = 34, right: bool = False) -> None:
        x0, y0, x1, y1 = self.box
        text = self.canvas.fit_text(text, LABEL_SIZE, max(y1 - y0 + 40, 40))
        if right:
            self.canvas.text((x1 + offset, (y0 + y1) / 2), text, LABEL_SIZE, anchor="mt", rotate=True)
        else:
            self.canvas.text((x0 - offset, (y0 + y1) / 2), text, LABEL_SIZE, anchor="mb", rotate=True)


def tick_room(canvas: Canvas, labels: Sequence[str], size: int = TICK_SIZE) -> float:
    """Pixels from a panel's edge to the far side of its widest tick label."""
    return TICK_PX + 3 + max((canvas.text_width(label, size) for label in labels), default=0.0)


def colour_bar(
    canvas: Canvas,
    box: tuple[float, float, float, float],
    name: str,
    vmin: float,
    vmax: float,
    label: str,
    ticks: np.ndarray | None = None,
    tick_labels: Sequence[str] | None = None,
) -> None:
    """A vertical colour bar in ``box`` for colour map ``name`` over ``[vmin, vmax]``, ticks and ``label``
    on the right (:func:`colour_bar_width` pixels from the bar's left edge in all)."""
    strip = colour_table(name)[::-1][:, None, :]
    panel = Panel(canvas, box, (0.0, 1.0), (vmin, vmax))
    panel.image(strip)
    panel.frame()
    values = nice_ticks(vmin, vmax, 5) if ticks is None else np.asarray(ticks)
    labels = [format_tick(v) for v in values] if tick_labels is None else list(tick_labels)
    panel.yticks(values, labels, right=True)
    panel.ylabel(label, offset=tick_room(canvas, labels) + 4, right=True)


BAR_PX = 14  # the width of a colour bar's strip


def colour_bar_width(canvas: Canvas, vmin: float, vmax: float, tick_labels: Sequence[str] | None = None) -> float:
    """Pixels a :func:`colour_bar` takes from its left edge: the strip, its tick labels and its title."""
    labels = [format_tick(v) for v in nice_ticks(vmin, vmax, 5)] if tick_labels is None else tick_labels
    return BAR_PX + tick_room(canvas, labels) + 4 + LABEL_SIZE + 4


_TITLE_SEPARATOR = "  ·  "  # between a figure title's heading, step and warnings (`common.compose_title`)
_LINE_GAP = 5  # pixels between the lines of a title


def wrap_text(canvas: Canvas, text: str, size: int, width: float) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (a word longer than that is cut)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and canvas.text_width(lines[-1] + " " + word, size) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return [canvas.fit_text(line, size, width) for line in lines]


def _title_rows(canvas: Canvas, title: str) -> list[tuple[list[str], int, tuple[int, int, int]]]:
    """The rows a figure title is written in: ``(pieces, size, colour)``. The first line of ``title``
    (heading, step, warnings, joined by the separator) keeps its pieces whole where it can, starting a new
    row at a separator when the row would be too wide; the lines under it (context, notes) are wrapped
    at spaces, in the smaller muted type."""
    room = canvas.width - 16
    rows: list[tuple[list[str], int, tuple[int, int, int]]] = []
    for number, line in enumerate(title.split("\n")):
        if number:
            rows += [([part], NOTE_SIZE, MUTED_RGB) for part in wrap_text(canvas, line, NOTE_SIZE, room)]
            continue
        packed: list[list[str]] = []
        for index, piece in enumerate(line.split(_TITLE_SEPARATOR)):
            joined = _TITLE_SEPARATOR.join(packed[-1] + [piece]) if packed else piece
            if index and canvas.text_width(joined, TITLE_SIZE) <= room:
                packed[-1].append(piece)
            elif canvas.text_width(piece, TITLE_SIZE) <= room:
                packed.append([piece])
            else:
                packed += [[part] for part in wrap_text(canvas, piece, TITLE_SIZE, room)]
        rows += [(pieces, TITLE_SIZE, TEXT_RGB) for pieces in packed]
    return rows


def title_height(canvas: Canvas, title: str, top: float = 8) -> float:
    """The y below ``title`` as :func:`title_block` writes it, without writing it."""
    return top + sum(size + _LINE_GAP for _, size, _ in _title_rows(canvas, title))


def title_block(canvas: Canvas, title: str, top: float = 8) -> float:
    """Write the figure ``title`` centred at the top, in as many rows as the width needs
    (:func:`_title_rows`); returns the y below it."""
    y = top
    first = True
    for pieces, size, fill in _title_rows(canvas, title):
        line = _TITLE_SEPARATOR.join(pieces)
        x = (canvas.width - canvas.text_width(line, size)) / 2
        for index, piece in enumerate(pieces):
            text = piece if index == 0 else _TITLE_SEPARATOR + piece
            # The heading stays the same from picture to picture and its mask is cached; the step changes.
            canvas.text((x, y), text, size, anchor="la", fill=fill, cache=first and index == 0)
            x += canvas.text_width(text, size)
        first = False
        y += size + _LINE_GAP
    return y


LEGEND_ROW = TICK_SIZE + 6  # pixels from one legend entry to the next
LEGEND_KEY = 26  # pixels of a legend entry's line sample


def legend_size(canvas: Canvas, entries: Sequence[tuple[str, tuple[int, int, int], str]]) -> tuple[float, float]:
    """``(width, height)`` of a one-column :func:`legend` of ``entries``, its margin included."""
    widest = max((canvas.text_width(label, TICK_SIZE) for label, _, _ in entries), default=0.0)
    return LEGEND_KEY + 6 + widest + 12, len(entries) * LEGEND_ROW + 6


def legend(
    canvas: Canvas,
    xy: tuple[float, float],
    entries: Sequence[tuple[str, tuple[int, int, int], str]],
    columns: int = 1,
    column_width: float = 160,
    background: bool = False,
) -> None:
    """Legend entries ``(label, colour, style)`` from ``xy`` (top left); style a line (``"-"``, ``"--"``,
    ``":"``, ``"-."``: :data:`DASHES`), ``"x"``, ``"v"``, ``"s"`` (a filled square) or ``"h"`` (a level: a
    thin dashed line with a dot). ``background``
    first clears a framed box of :func:`legend_size` (one column) to white: a legend inside a plot."""
    x0, y0 = xy
    if background:
        width, height = legend_size(canvas, entries)
        canvas.rectangle((x0, y0, x0 + width, y0 + height), outline=GRID_RGB, fill=(255, 255, 255))
        x0, y0 = x0 + 6, y0 + 3
    for index, (label, colour, style) in enumerate(entries):
        row, column = divmod(index, columns)
        x, y = x0 + column * column_width, y0 + row * LEGEND_ROW + LEGEND_ROW / 2
        if style in DASHES:
            canvas.line([(x, y), (x + LEGEND_KEY, y)], colour, width=3, dash=1.2 * DASHES[style])
        elif style == "s":
            canvas.rectangle((x + 6, y - 7, x + 20, y + 7), fill=colour)
        elif style == "h":  # a level: a thin dashed line, and a dot where a curve crosses it
            canvas.line([(x, y), (x + LEGEND_KEY, y)], colour, width=1.3, dash=6)
            canvas.markers(np.array([x + LEGEND_KEY / 2]), np.array([y]), colour, radius=4.5)
        else:
            canvas.markers(np.array([x + LEGEND_KEY / 2]), np.array([y]), colour, radius=5,
                           shape="x" if style == "x" else "v")
        canvas.text((x + LEGEND_KEY + 6, y), canvas.fit_text(label, TICK_SIZE, column_width - LEGEND_KEY - 8),
                    TICK_SIZE, anchor="lm")


def quiet_corner(panel: Panel, size: tuple[float, float], points: Sequence[np.ndarray], inset: float = 6) -> tuple[float, float]:
    """The top left of a ``size`` box in the corner of ``panel`` that covers the fewest of ``points``
    (``(n, 2)`` pixel arrays: the curves drawn in it): where a legend hides the least. Ties go to the top
    right, then the top left."""
    x0, y0, x1, y1 = panel.box
    width, height = size
    corners = [(x1 - inset - width, y0 + inset), (x0 + inset, y0 + inset), (x1 - inset - width, y1 - inset - height),
               (x0 + inset, y1 - inset - height)]
    every = np.concatenate([_densify(np.asarray(p, dtype=np.float64).reshape(-1, 2)) for p in points]
                           or [np.zeros((0, 2))])
    best, fewest = corners[0], None
    for cx, cy in corners:
        inside = ((every[:, 0] >= cx - 4) & (every[:, 0] <= cx + width + 4) & (every[:, 1] >= cy - 4)
                  & (every[:, 1] <= cy + height + 4))
        count = int(inside.sum())
        if fewest is None or count < fewest:
            best, fewest = (cx, cy), count
    return best


def _densify(points: np.ndarray, step: float = 4.0) -> np.ndarray:
    """Points along the polyline ``points`` at most ``step`` pixels apart (its vertices included)."""
    if len(points) < 2:
        return points
    along = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))))
    where = np.union1d(along, np.arange(0.0, along[-1], step))
    return np.column_stack((np.interp(where, along, points[:, 0]), np.interp(where, along, points[:, 1])))
