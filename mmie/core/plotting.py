"""Axis scales that fit the data, shared by every stage that draws (gate, report)."""

from __future__ import annotations

import math
from collections.abc import Sequence

DECADES = 2.0


def fit_scale(ax, values: Sequence[float | None], axis: str = "y") -> str:
    """Log scale when the nonzero magnitudes span more than ``DECADES`` decades (a 1e6 ratio
    flattens every other point on a linear axis), symlog when zeros or negatives sit among
    them; linear otherwise. Returns the scale set."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    sizes = [abs(v) for v in finite if v != 0]
    if not sizes or math.log10(max(sizes) / min(sizes)) <= DECADES:
        return "linear"
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if all(v > 0 for v in finite):
        setter("log")
        return "log"
    setter("symlog", linthresh=min(sizes))
    if min(finite) >= 0:  # the autoscale margin would otherwise open a decade of negatives
        (ax.set_ylim if axis == "y" else ax.set_xlim)(0, None)
    return "symlog"
