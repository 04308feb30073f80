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

TITLE_SIZE = 12
PANEL_TITLE_SIZE = 11
LABEL_SIZE = 10
TICK_SIZE = 9


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
    """``(256, 3)`` uint8 table of colour map ``name`` (``"sequential"`` or ``"diverging"``)."""
    s = np.linspace(0.0, 1.0, 256)
    if name == "sequential":
        return _lch_ramp(0.30 + 0.63 * s, 0.10 + 0.07 * s, 290.0 - 185.0 * s)
    if name == "diverging":
        side = np.abs(2 * s - 1)  # 0 in the middle, 1 at both ends
        lightness = 0.97 - 0.50 * side**1.1
        chroma = 0.19 * np.sin(np.pi / 2 * np.minimum(side * 1.15, 1.0))
        hue = np.where(s < 0.5, 255.0, 28.0)
        return _lch_ramp(lightness, chroma, hue)
    raise ValueError(f"Unknown colour map {name!r}; use 'sequential' or 'diverging'.")


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


_CACHED_TEXT = 64  # longest text kept in the cache (axis titles, legends, headings; a title's step is not)


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

    def line(
        self,
        points: Sequence[tuple[float, float]] | np.ndarray,
        fill: tuple[int, int, int],
        width: float = 1.0,
        dash: float = 0.0,
    ) -> None:
        """A polyline through ``points``; ``dash`` > 0 draws dashes and gaps of that many pixels."""
        points = (np.asarray(points, dtype=np.float64).reshape(-1, 2) - self.origin) * self.scale
        if len(points) < 2:
            return
        stroke = max(1, round(width * self.scale))
        if dash <= 0:
            self.draw.line(points.ravel().tolist(), fill=fill, width=stroke, joint="curve")
            return
        period = dash * self.scale
        lengths = np.hypot(*np.diff(points, axis=0).T)
        along = np.concatenate(([0.0], np.cumsum(lengths)))
        total = along[-1]
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
        offsets = [(dx, dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)]
        if shape == "dot":
            offsets = [(dx, dy) for dx, dy in offsets if dx * dx + dy * dy <= r * r + r]
        elif shape == "x":
            offsets = [(dx, dy) for dx, dy in offsets if abs(dx) == abs(dy)]
            offsets += [(dx + 1, dy) for dx, dy in offsets]
        elif shape == "v":
            offsets = [(dx, dy) for dx, dy in offsets if abs(dx) <= (r - dy) / 2 + 0.5]
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
        dx, dy = np.array(offsets, dtype=np.int64).T
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
            self.canvas.line([(x, y1), (x, y1 + 4)], FRAME_RGB)
            if rotate:
                self.canvas.text((x, y1 + 6), label, size, anchor="rm", rotate=True)
            else:
                self.canvas.text((x, y1 + 6), label, size, anchor="ma")

    def yticks(self, values: np.ndarray, labels: Sequence[str] | None = None, size: int = TICK_SIZE,
               right: bool = False) -> None:
        x0, _, x1, _ = self.box
        labels = [format_tick(v) for v in values] if labels is None else labels
        for y, label in zip(self.y(values), labels):
            if right:
                self.canvas.line([(x1, y), (x1 + 4, y)], FRAME_RGB)
                self.canvas.text((x1 + 6, y), label, size, anchor="lm")
            else:
                self.canvas.line([(x0 - 4, y), (x0, y)], FRAME_RGB)
                self.canvas.text((x0 - 6, y), label, size, anchor="rm")

    def title(self, text: str, right: str = "") -> None:
        x0, y0, x1, _ = self.box
        if right:
            self.canvas.text((x1, y0 - 4), right, TICK_SIZE, anchor="rd", fill=MUTED_RGB)
            room = x1 - x0 - self.canvas.text_width(right, TICK_SIZE) - 10
        else:
            room = x1 - x0
        self.canvas.text((x0, y0 - 4), self.canvas.fit_text(text, PANEL_TITLE_SIZE, room), PANEL_TITLE_SIZE,
                         anchor="ld")

    def xlabel(self, text: str, offset: float = 22) -> None:
        x0, _, x1, y1 = self.box
        self.canvas.text(((x0 + x1) / 2, y1 + offset), text, LABEL_SIZE, anchor="ma")

    def ylabel(self, text: str, offset: float = 34, right: bool = False) -> None:
        x0, y0, x1, y1 = self.box
        if right:
            self.canvas.text((x1 + offset, (y0 + y1) / 2), text, LABEL_SIZE, anchor="mt", rotate=True)
        else:
            self.canvas.text((x0 - offset, (y0 + y1) / 2), text, LABEL_SIZE, anchor="mb", rotate=True)


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
    """A vertical colour bar in ``box`` for colour map ``name`` over ``[vmin, vmax]``, ticks on the right."""
    strip = colour_table(name)[::-1][:, None, :]
    panel = Panel(canvas, box, (0.0, 1.0), (vmin, vmax))
    panel.image(strip)
    panel.frame()
    values = nice_ticks(vmin, vmax, 5) if ticks is None else np.asarray(ticks)
    panel.yticks(values, tick_labels, right=True)
    widest = max((canvas.text_width(t, TICK_SIZE) for t in (tick_labels or [format_tick(v) for v in values])),
                 default=0.0)
    panel.ylabel(label, offset=widest + 12, right=True)


def title_block(canvas: Canvas, title: str, top: float = 8) -> float:
    """Write the (one- or two-line) figure ``title`` centred at the top; returns the y below it."""
    y = top
    for number, line in enumerate(title.split("\n")):
        size = TITLE_SIZE if number == 0 else LABEL_SIZE
        fill = TEXT_RGB if number == 0 else MUTED_RGB
        fitted = canvas.fit_text(line, size, canvas.width - 16)
        pieces = line.split(_TITLE_SEPARATOR) if fitted == line else [fitted]
        if len(pieces) == 1:
            canvas.text((canvas.width / 2, y), fitted, size, anchor="ma", fill=fill)
        else:
            # The heading stays the same from picture to picture and its mask is cached; the step changes.
            pieces = [pieces[0]] + [_TITLE_SEPARATOR + piece for piece in pieces[1:]]
            x = (canvas.width - canvas.text_width(line, size)) / 2
            for index, piece in enumerate(pieces):
                canvas.text((x, y), piece, size, anchor="la", fill=fill, cache=index == 0)
                x += canvas.text_width(piece, size)
        y += size + 6
    return y


_TITLE_SEPARATOR = "  ·  "  # between a figure title's heading, step and warnings (`common.compose_title`)


def legend(
    canvas: Canvas,
    xy: tuple[float, float],
    entries: Sequence[tuple[str, tuple[int, int, int], str]],
    columns: int = 1,
    column_width: float = 120,
) -> None:
    """Legend entries ``(label, colour, style)`` from ``xy`` (top left); style a line (``"-"``, ``"--"``,
    ``":"``, ``"-."``: :data:`DASHES`), ``"x"``, ``"v"`` or ``"s"`` (a filled square)."""
    x0, y0 = xy
    for index, (label, colour, style) in enumerate(entries):
        row, column = divmod(index, columns)
        x, y = x0 + column * column_width, y0 + row * (TICK_SIZE + 7) + TICK_SIZE / 2 + 1
        if style in DASHES:
            canvas.line([(x, y), (x + 20, y)], colour, width=1.6, dash=0.8 * DASHES[style])
        elif style == "s":
            canvas.rectangle((x + 5, y - 5, x + 15, y + 5), fill=colour)
        else:
            canvas.markers(np.array([x + 10]), np.array([y]), colour, radius=3, shape="x" if style == "x" else "v")
        canvas.text((x + 26, y), canvas.fit_text(label, TICK_SIZE, column_width - 30), TICK_SIZE, anchor="lm")
