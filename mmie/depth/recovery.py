"""Recovery fraction of a relearning attack: how much of what the arm removed came back.

For a metric m measured on held-out forget texts (mean NLL per token, or forget-script mass),

    recovery(k) = (m_arm(0) - m_arm(k)) / (m_arm(0) - m_base)

with m_arm(k) the arm's value after k attack steps and m_base the base model's before any attack:
0 = nothing came back, 1 = back to the base model (above 1: beyond it). The sign of the metric
does not matter (numerator and denominator flip together). Each m is a ratio of sums over texts
(NLL summed over tokens / tokens), so the interval resamples whole texts, arm and base values of
a text together (:func:`mmie.core.stats.bootstrap_statistic`). An arm that removed nothing
(denominator 0) has no recovery fraction; it is recorded as missing with that reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from mmie.core.errors import MetricError
from mmie.core.stats import bootstrap_statistic
from mmie.metrics import depth as metric_depth


@dataclass(frozen=True)
class Sums:
    """Per-text numerators and denominators of a ratio metric (``value = sum(num) / sum(den)``)."""

    num: np.ndarray
    den: np.ndarray

    @classmethod
    def of(cls, num, den) -> Sums:
        num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
        if num.shape != den.shape or num.ndim != 1:
            raise MetricError(f"per-text sums must be 1-D and equal in length: {num.shape}, "
                              f"{den.shape}")
        return cls(num, den)

    def value(self, idx=None) -> np.ndarray:
        idx = np.arange(len(self.num)) if idx is None else np.asarray(idx)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.num[idx].sum(-1) / self.den[idx].sum(-1)


def recovery_fraction(arm_before: Sums, arm_after: Sums, base: Sums, idx=None) -> np.ndarray:
    """The module's formula on texts ``idx`` (all when None); NaN where nothing was removed."""
    return metric_depth.recovery_fraction(arm_before.value(idx), arm_after.value(idx),
                                          base.value(idx))


def recovery_interval(arm_before: Sums, arm_after: Sums, base: Sums, *, n_boot: int = 2000,
                      alpha: float = 0.05, seed: int = 0) -> dict:
    """``{value, low, high, method}``, or ``{value: None, missing: reason}``."""
    n = len(arm_before.num)
    if not len(arm_after.num) == len(base.num) == n:
        raise MetricError(f"arm and base were scored on different texts ({n}, "
                          f"{len(arm_after.num)}, {len(base.num)})")
    if float(arm_before.value() - base.value()) == 0.0:
        return {"value": None, "missing": "the arm removed nothing (arm = base before the "
                                          "attack): no recovery fraction"}
    try:
        boot = bootstrap_statistic(
            n, lambda idx: recovery_fraction(arm_before, arm_after, base, idx),
            n_boot=n_boot, alpha=alpha, seed=seed)
    except MetricError as exc:
        value = float(recovery_fraction(arm_before, arm_after, base))
        return {"value": value, "missing_interval": str(exc)}
    ci = boot.ci
    return {"value": ci.estimate, "low": ci.low, "high": ci.high, "method": ci.method}


def plot_png(metrics: dict) -> bytes:
    """Per metric: the arm and base curves over attack steps, and the recovery fraction."""
    from matplotlib.figure import Figure

    names = [m for m in metrics["metrics"] if metrics["curves"]["arm"].get(m)]
    fig = Figure(figsize=(8, 3 * max(1, len(names))), layout="constrained")
    axes = fig.subplots(max(1, len(names)), 2, squeeze=False)
    for row, name in zip(axes, names, strict=False):
        for run, style in (("arm", "-"), ("base", "--")):
            curve = metrics["curves"][run][name]
            row[0].plot([int(s) for s in curve], list(curve.values()), style, marker="o",
                        label=run)
        row[0].set(title=f"{name} on held-out forget texts", xlabel="attack step")
        row[0].legend(fontsize=7)
        cells = metrics["recovery"].get(name, {})
        pts = [(int(s), c) for s, c in cells.items() if c.get("value") is not None]
        if pts:
            xs = [s for s, _ in pts]
            row[1].plot(xs, [c["value"] for _, c in pts], marker="o", color="tab:red")
            if all("low" in c for _, c in pts):
                row[1].fill_between(xs, [c["low"] for _, c in pts], [c["high"] for _, c in pts],
                                    color="tab:red", alpha=0.2)
        row[1].axhline(1.0, color="grey", linestyle=":")
        row[1].set(title=f"recovery fraction ({name})", xlabel="attack step")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
