"""A numpy reference for the package's one histogram (``render.report.histogram_buckets``, counted where the
record lives), and a quick way for the sinks' tests to make a :class:`~lightning_rnnviz.sinks.Histogram`."""

from __future__ import annotations

import numpy as np

from lightning_rnnviz.sinks import Histogram


def numpy_histogram(values: np.ndarray, bins: int = 64) -> Histogram | None:
    """``bins`` equal buckets between the minimum and maximum of the finite ``values`` (the last includes the
    maximum), the float32 bucket index computed as the package computes it; ``None`` when none is finite."""
    values = np.asarray(values, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    low, high = float(values.min()), float(values.max())
    if high > low:
        index = ((values - np.float32(low)) * np.float32(bins / (high - low))).astype(np.int32)
        counts = np.bincount(np.minimum(index, bins - 1), minlength=bins)
        limits = np.linspace(low, high, bins + 1)[1:]
    else:
        counts, limits = np.array([values.size]), np.array([high])
    as64 = values.astype(np.float64)
    return Histogram(min=low, max=high, num=float(values.size), sum=float(as64.sum()),
                     sum_squares=float((as64 * as64).sum()), limits=np.asarray(limits, dtype=np.float64),
                     counts=counts.astype(np.float64))
