"""Shared pieces of the renderers: statistic names, time binning, titles, colormaps, figure -> pixels.

Renderers build a :class:`matplotlib.figure.Figure` directly and rasterise it with
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`; nothing here touches pyplot's global figure
registry, so figures need no closing and the code is safe to run in a worker process.
"""

from __future__ import annotations

import functools
import io
import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from lightning_rnnviz.render._lazy import torch

if TYPE_CHECKING:
    from lightning_rnnviz.probe.records import AttentionRecord, RNNRecord


def indicator(values: torch.Tensor, compare: Any, threshold: float) -> torch.Tensor:
    """``compare(values, threshold)`` (``torch.lt``, ``torch.gt``, ...) as float32 ones and zeros: written
    into a float tensor, a comparison ran several times faster on the CPU than into a bool one (0.036
    against 0.133 ms for 400 thousand values), and its float sum too. Sum it with :func:`exact_count`."""
    return compare(values, threshold, out=torch.empty(values.shape, dtype=torch.float32, device=values.device))


def exact_count(ones: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """How many ones a 0/1 float tensor holds (along ``dim``, or in all): summed in float32 while no sum
    can reach 2**24, so that every partial sum is an exact integer, else in float64."""
    dtype = torch.float32 if (ones.numel() if dim is None else ones.shape[dim]) < 2**24 else torch.float64
    return ones.sum(dtype=dtype) if dim is None else ones.sum(dim, dtype=dtype)


# The pictures are seen in TensorBoard's image cards, about 350 px wide (1600x1200 window), and in W&B's
# media panels of about that size: they are laid out for a figure 4 inches wide, where type of 9 points is
# 1/32 of the width and keeps capitals and digits 8 px tall on a card. Drawn at 140 dpi: 560 px wide.
DPI = 140
FIGURE_WIDTH = 4.0  # inches
MAX_INCHES = 800 / DPI  # 800 px
BAD_COLOR = "#ff00ff"  # magenta: absent from both the diverging and the sequential maps below
DIVERGING_CMAP = "RdBu_r"
SEQUENTIAL_CMAP = "viridis"
TITLE_SIZE = 10
PANEL_TITLE_SIZE = 9.5
LABEL_SIZE = 9
TICK_SIZE = 9
LINE_WIDTH = 2.0  # points: 2.4 px on a card
TITLE_SEPARATOR = "  ·  "  # between a title's heading, step and warnings (:func:`compose_title`)

# Kinds whose hidden state is tanh(.) or o * tanh(c) and so lies in [-1, 1]. A projected LSTM and a ReLU
# RNN are unbounded; "RNNCell" does not say which nonlinearity it uses (see `hidden_is_tanh_bounded`).
_TANH_KINDS = frozenset({"GRU", "GRUCell", "RNN_TANH", "LSTMCell"})


def row_suffix(record: RNNRecord, index: int) -> str:
    """Suffix that names row ``index`` of the ``layers*directions`` axis in a statistic's name.

    Empty when the record has a single row, so a one-layer unidirectional module logs plain names.

    Example::

        >>> import torch
        >>> from lightning_rnnviz.probe.records import RNNRecord
        >>> rec = RNNRecord("rnn", "GRU", torch.zeros(4, 1, 3, 2), {}, None, None, None,
        ...                 torch.tensor([3]), num_layers=2, num_directions=2)
        >>> [row_suffix(rec, i) for i in range(4)]
        ['/layer0', '/layer0_reverse', '/layer1', '/layer1_reverse']
    """
    rows = record.num_layers * record.num_directions
    if not 0 <= index < rows:
        raise IndexError(
            f"Row `index`={index} is out of range for {rows} layer*direction rows of {record.name!r}."
        )
    if rows == 1:
        return ""
    layer, direction = divmod(index, record.num_directions)
    return f"/layer{layer}" + ("_reverse" if direction == 1 else "")


def hidden_is_tanh_bounded(record: RNNRecord) -> bool:
    """Whether ``h_t`` is known to lie in ``[-1, 1]``.

    ``"RNNCell"`` records do not carry their nonlinearity, so a cell counts as tanh when its finite values
    lie in ``[-1, 1]`` and some are negative (a ReLU cell never goes below zero).
    """
    if record.kind in _TANH_KINDS:
        return True
    if record.kind == "LSTM":
        inner = record.cell if record.cell is not None else record.gates.get("output")
        # proj_size < hidden_size, so a projected LSTM has a narrower h than c
        return inner is None or inner.shape[-1] == record.hidden.shape[-1]
    if record.kind == "RNNCell":
        h = record.hidden[record.hidden.isfinite()]
        return h.numel() > 0 and bool(h.abs().max() <= 1) and bool((h < 0).any())
    return False


def check_sample(sample: int, batch: int) -> int:
    if not isinstance(sample, (int, np.integer)) or isinstance(sample, bool) or not 0 <= sample < batch:
        raise ValueError(
            f"`sample`={sample!r} is out of range for a batch of {batch}; "
            f"pass an int with 0 <= sample < {batch}."
        )
    return int(sample)


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}`={value!r} must be a positive int.")
    return int(value)


def check_labels(name: str, labels: Sequence[str] | None, needed: int) -> list[str] | None:
    """The first ``needed`` labels as strings, or ``None``; too few labels is an error."""
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) < needed:
        raise ValueError(
            f"`{name}` has {len(labels)} entries but {needed} steps are shown; pass one per step."
        )
    return labels[:needed]


def bin_size(length: int, max_bins: int) -> int:
    """Smallest bin width that leaves at most ``max_bins`` bins of ``length`` steps."""
    return max(1, math.ceil(length / max_bins))


def bin_axis(
    values: np.ndarray | Any, max_bins: int, axis: int = -1, reduce: str = "mean"
) -> tuple[np.ndarray, int]:
    """Average (or sum) consecutive steps along ``axis`` so that at most ``max_bins`` remain.

    The last bin may be shorter; its mean divides by the steps it really holds. A non-finite step makes its
    bin non-finite, so NaN and Inf stay visible after binning. ``values`` may be a torch tensor on any
    device: it is binned there (:func:`bin_tensor`) and only the binned array crosses to the host.

    Returns:
        The binned array (numpy, float) and the bin width (1 when nothing was binned).
    """
    if hasattr(values, "detach"):
        binned, width = bin_tensor(values, max_bins, axis, reduce)
        return host(binned), width
    values = np.asarray(values)
    length = values.shape[axis]
    width = bin_size(length, max_bins)
    if width == 1:
        return values, 1
    moved = np.moveaxis(values, axis, -1)
    bins = math.ceil(length / width)
    pad = bins * width - length
    padded = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), dtype=moved.dtype)], axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = padded.reshape(moved.shape[:-1] + (bins, width)).sum(-1, dtype=np.float64)
    if reduce == "mean":
        counts = np.full(bins, float(width))
        counts[-1] = width - pad
        sums = sums / counts
    elif reduce != "sum":
        raise ValueError(f"`reduce`={reduce!r} is not supported; use 'mean' or 'sum'.")
    return np.moveaxis(sums.astype(np.float32), -1, axis), width


def bin_tensor(values: Any, max_bins: int, axis: int = -1, reduce: str = "mean") -> tuple[Any, int]:
    """:func:`bin_axis` of a torch tensor, computed where the tensor lives; the result is a tensor there
    (float32 when binned, ``values`` itself when not)."""
    values = values.detach()
    length = values.shape[axis]
    width = bin_size(length, max_bins)
    if width == 1:
        return values, 1
    if reduce not in ("mean", "sum"):
        raise ValueError(f"`reduce`={reduce!r} is not supported; use 'mean' or 'sum'.")
    moved = values.movedim(axis, -1)
    bins = math.ceil(length / width)
    pad = bins * width - length
    padded = torch.nn.functional.pad(moved, (0, pad)) if pad else moved
    sums = padded.reshape(moved.shape[:-1] + (bins, width)).sum(-1, dtype=torch.float64)
    if reduce == "mean":
        counts = torch.full((bins,), float(width), dtype=torch.float64, device=sums.device)
        counts[-1] = width - pad
        sums = sums / counts
    return sums.float().movedim(-1, axis), width


def host(values: Any) -> np.ndarray:
    """A tensor's values as a numpy array on the host (copied from the device if it lives on one)."""
    return values.detach().cpu().numpy()


def tick_positions(count: int, max_ticks: int) -> np.ndarray:
    """Evenly thinned indices ``0, k, 2k, ...`` with at most ``max_ticks`` entries."""
    return np.arange(0, count, bin_size(count, max_ticks))


def nonfinite_flag(*arrays: np.ndarray | Any | None) -> str:
    """``""``, ``"NaN"``, ``"Inf"`` or ``"NaN and Inf"`` for what the arrays (numpy, or tensors on any
    device, checked there) contain."""
    has_nan = has_inf = False
    for array in arrays:
        if array is None:
            continue
        if isinstance(array, np.ndarray):
            has_nan = has_nan or bool(np.isnan(array).any())
            has_inf = has_inf or bool(np.isinf(array).any())
        elif array.numel():
            has_nan = has_nan or bool(array.isnan().any())
            has_inf = has_inf or bool(array.isinf().any())
    return " and ".join(word for word, present in (("NaN", has_nan), ("Inf", has_inf)) if present)


def escape_text(text: str) -> str:
    """Make user text (module names, tokens) safe from mathtext parsing."""
    return text.replace("$", r"\$")


def short_label(text: str, limit: int = 12) -> str:
    text = escape_text(text.replace("\n", " "))
    return text if len(text) <= limit else text[: limit - 2] + ".."


def record_header(record: RNNRecord | AttentionRecord) -> dict[str, Any]:
    """The identity fields every payload carries."""
    return {
        "name": record.name,
        "kind": record.kind,
        "exact": bool(record.exact),
        "notes": tuple(record.notes),
        # which calls a record shows, which module its final state starts: said on the pictures
        "context": tuple(getattr(record, "context", ())),
    }


def compose_title(
    heading: str,
    payload: dict[str, Any],
    step: int | None = None,
    nonfinite: str = "",
    width: int = 95,
    escape: bool = True,
    validation: bool = False,
) -> str:
    """Figure title: heading, training step, ``contains NaN`` warning and the approximation note below it.

    The step is the training step (``train step 120``), so that it is not read as a step of the time axis
    beside it; a ``validation`` picture says so (``validation at train step 120``). The note is wrapped onto
    as many lines as it needs (``width`` characters each), never cut. ``escape`` protects ``$`` from
    matplotlib's mathtext; the raster painter writes text as it is.

    Example::

        >>> compose_title("rnn: hidden state h_t, sequence 0", {}, 120)
        'rnn: hidden state h_t, sequence 0  ·  train step 120'
        >>> compose_title("rnn: hidden state h_t, sequence 0", {}, 120, validation=True)
        'rnn: hidden state h_t, sequence 0  ·  validation at train step 120'
    """
    protect = escape_text if escape else str
    line = protect(heading)
    if step is not None:
        line += f"  ·  {'validation at ' if validation else ''}train step {step}"
    elif validation:
        line += "  ·  validation"
    if nonfinite:
        line += f"  ·  contains {nonfinite}"
    for remark in payload.get("context", ()):
        line += "\n" + "\n".join(textwrap.wrap(protect(remark), width=width))
    if not payload.get("exact", True):
        note = "; ".join(payload.get("notes", ())) or "replay differs from training"
        line += "\n" + "\n".join(textwrap.wrap(protect(f"(approximate: {note})"), width=width))
    return line


@functools.cache
def colormap(name: str) -> Colormap:
    """Colormap ``name`` with NaN/Inf (masked) cells drawn in :data:`BAD_COLOR`."""
    return matplotlib.colormaps[name].with_extremes(bad=BAD_COLOR)


def new_figure(width: float, height: float) -> Figure:
    """A figure of at most :data:`FIGURE_WIDTH` x :data:`MAX_INCHES` inches at :data:`DPI`, not registered
    with pyplot."""
    return Figure(figsize=(min(width, FIGURE_WIDTH), min(max(height, 1.0), MAX_INCHES)), dpi=DPI)


def text_width(text: str, size: float) -> float:
    """Inches that ``text`` takes on one line at ``size`` points in matplotlib's default font."""
    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))  # cached per thread
    font.set_size(size, 72)
    font.set_text(text, 0.0)
    return font.get_width_height()[0] / 64 / 72


def fit_lines(text: str, size: float, width: float = FIGURE_WIDTH - 0.15, separator: str = TITLE_SEPARATOR) -> str:
    """``text`` with each of its lines broken so that it fits ``width`` inches at ``size`` points: at the
    ``separator`` first (the pieces of a title stay whole: its heading, ``train step N``, ``contains NaN``),
    then between words; nothing is cut."""
    out = []
    for line in text.split("\n"):
        if text_width(line, size) <= width:
            out.append(line)
            continue
        current = ""
        for piece in line.split(separator):
            joined = current + separator + piece if current else piece
            if not current or text_width(joined, size) <= width:
                current = joined
            else:
                out.append(current)
                current = piece
        out.append(current)
    return "\n".join(_fit_pieces(line, size, width) for line in out)


def _fit_pieces(line: str, size: float, width: float, breaks: tuple[str, ...] = (": ", ", ", " ", ".")) -> str:
    """``line`` broken where it must: after a ``": "`` or a ``", "`` when every piece then fits, else between
    words (a word too long broken after a ``"."``)."""
    if text_width(line, size) <= width or not breaks:
        return line
    mark, rest = breaks[0], breaks[1:]
    pieces = line.split(mark)
    if len(pieces) == 1:
        return _fit_pieces(line, size, width, rest)
    glue = mark.strip()
    lines, current = [], ""
    for index, piece in enumerate(pieces):
        piece = piece + (glue if index < len(pieces) - 1 else "")
        joined = current + (" " if mark.endswith(" ") else "") + piece if current else piece
        if current and text_width(joined, size) > width:
            lines.append(current)
            current = piece
        else:
            current = joined
    lines.append(current)
    if len(rest) >= 2 and any(text_width(piece, size) > width for piece in lines):
        return _fit_pieces(line, size, width, rest)  # ": " and ", " only where they suffice
    return "\n".join(_fit_pieces(piece, size, width, rest) for piece in lines)


def card_title(fig: Figure, title: str, size: float = TITLE_SIZE) -> float:
    """Write ``title`` (from :func:`compose_title`, its lines broken to fit the figure: :func:`fit_lines`)
    at the top of ``fig``; returns the inches it takes from the top."""
    text = fit_lines(title, size, fig.get_size_inches()[0] - 0.15)
    fig.suptitle(text, fontsize=size, y=1 - 0.04 / fig.get_size_inches()[1], va="top", linespacing=1.15)
    return title_height(text, size)


def title_height(text: str, size: float = TITLE_SIZE) -> float:
    """Inches above the panels for ``text`` (already broken into lines) at ``size`` points."""
    return 0.08 + (text.count("\n") + 1) * size * 1.15 / 72


def top_margin(title: str, base: float = 0.12, size: float = TITLE_SIZE, width: float = FIGURE_WIDTH) -> float:
    """Inches above the panels for ``title`` (as :func:`card_title` writes it in a figure ``width`` inches
    wide) and ``base`` more (room for the panels' own titles)."""
    return base + title_height(fit_lines(title, size, width - 0.15), size)


def label_extent(labels: Sequence[str] | None, fontsize: float = TICK_SIZE, limit: int = 12) -> float:
    """Inches that the longest of ``labels`` (as :func:`short_label` shortens it to ``limit``) takes when
    written."""
    if not labels:
        return 0.0
    return max(text_width(short_label(label, limit), fontsize) for label in labels) + 0.05


def panel_grid(
    fig: Figure,
    nrows: int,
    ncols: int,
    *,
    left: float = 0.75,
    right: float = 0.2,
    top: float = 0.55,
    bottom: float = 0.55,
    hspace: float = 0.55,
    wspace: float = 0.45,
    **kwargs: Any,
) -> Any:
    """GridSpec with margins and gaps in inches (fixed margins cost far less than a layout engine)."""
    width, height = fig.get_size_inches()
    panel_h = max((height - top - bottom - hspace * (nrows - 1)) / nrows, 0.3)
    panel_w = max((width - left - right - wspace * (ncols - 1)) / ncols, 0.3)
    return fig.add_gridspec(
        nrows,
        ncols,
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        hspace=hspace / panel_h,
        wspace=wspace / panel_w,
        **kwargs,
    )


def interpolation_for(shape: tuple[int, ...], fig: Figure, spec: Any) -> str:
    """``"nearest"`` while every cell of a ``(..., rows, columns)`` image in panel ``spec`` gets a pixel;
    ``"antialiased"`` when cells must be merged (nearest would silently drop some)."""
    box = spec.get_position(fig)
    width, height = fig.get_size_inches() * DPI
    rows, columns = shape[-2:]
    return "nearest" if rows <= box.height * height and columns <= box.width * width else "antialiased"


def message_figure(title: str, message: str) -> Figure:
    """A small figure that says why there is nothing to draw."""
    text = fit_lines(title, TITLE_SIZE)
    fig = new_figure(FIGURE_WIDTH, title_height(text) + 1.0)
    card_title(fig, title)
    fig.text(0.5, 0.5 / fig.get_size_inches()[1], fit_lines(escape_text(message), LABEL_SIZE + 1),
             ha="center", va="center", fontsize=LABEL_SIZE + 1)
    return fig


def _agg_canvas(fig: Figure) -> FigureCanvasAgg:
    canvas = fig.canvas
    return canvas if isinstance(canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Rasterise ``fig`` with Agg into a ``(height, width, 3)`` uint8 array (owned by the caller)."""
    canvas = _agg_canvas(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def figure_to_png(fig: Figure) -> bytes:
    """Encode ``fig`` as PNG bytes with Agg."""
    canvas = _agg_canvas(fig)
    buffer = io.BytesIO()
    canvas.print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()


COLORBAR_MARGIN = 0.85
"""Inches right of the panels of a heatmap figure for its colour bar, the bar's ticks and its label."""


def finish_heatmap(fig: Figure, image: Any, label: str, bottom: float, top: float, nonfinite: str, title: str) -> Figure:
    """Shared ending of the heatmap figures: a colour bar in the right margin (:data:`COLORBAR_MARGIN`),
    the NaN/Inf key under it, the title.

    ``bottom`` and ``top`` are the figure margins in inches, as the panels were laid out with.
    """
    width, height = fig.get_size_inches()
    left = width - COLORBAR_MARGIN + 0.12
    cax = fig.add_axes((left / width, bottom / height, 0.11 / width, 1 - (bottom + top) / height))
    colorbar = fig.colorbar(image, cax=cax)
    colorbar.set_label(label, fontsize=LABEL_SIZE, labelpad=2)
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(4))
    colorbar.ax.tick_params(labelsize=TICK_SIZE, length=2.5, pad=1.5)
    if nonfinite:
        fig.legend(handles=[Patch(color=BAD_COLOR, label=nonfinite)], loc="lower right", bbox_to_anchor=(1, 0),
                   fontsize=TICK_SIZE, frameon=False, handlelength=0.9, handletextpad=0.3, borderaxespad=0.15)
    card_title(fig, title)
    return fig
