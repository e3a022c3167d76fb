"""One-sided confidence bounds with the p-values that match them, for the gate decisions.

Every gate is a one-sided claim "theta < t" or "theta > t" (or both, for a band) tested at
level alpha. A bound and its p-value come from one construction, so "the bound clears the
threshold" and "p < alpha" are the same statement:

* a proportion (x of n): the exact Clopper-Pearson bound (Clopper & Pearson 1934), and the
  exact binomial test. It is never
  zero-width: 0 of 16 has the one-sided 95% upper bound 0.17;
* a ratio of two proportions (arm / baseline on the same prompts): the Clopper-Pearson bounds
  of each at alpha/2, divided (Bonferroni). Conservative, since it ignores the pairing that
  would narrow it, but exact and never zero-width;
* any other statistic: the BCa bootstrap (Efron 1987), computed here so that the bound can be
  inverted into its p-value (the level at which the bound meets the threshold).

``min_n`` is the smallest sample size at which the most favourable data could pass: below it
a PASS is impossible, and the gate says "insufficient evidence" instead of a bare FAIL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, binom, norm

from mmie.core.errors import MetricError

LESS, GREATER = "less", "greater"
MAX_N = 100_000
# Below this many samples the BCa bound's coverage is not trustworthy (its bias and
# acceleration corrections are themselves estimated from the sample; Efron & Tibshirani 1993,
# ch. 14); a bootstrap gate on fewer samples reports insufficient evidence.
BOOTSTRAP_MIN_N = 20


@dataclass(frozen=True)
class Bound:
    """A one-sided (1 - alpha) bound on the side that must clear the threshold.

    value: the bound (upper for 'less', lower for 'greater'); p: the matching one-sided
    p-value; method: how it was made; zero_width: every resample gave one value.
    """

    estimate: float
    value: float
    p: float
    method: str
    zero_width: bool = False


def _check(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")


def cp_bound(x: int, n: int, alpha: float, side: str) -> float:
    """Exact one-sided (1 - alpha) Clopper-Pearson bound: upper for 'less', lower else.

    The beta quantiles themselves (what statsmodels ``proportion_confint(method='beta')``
    returns at level 2 alpha; the tests check they agree), called directly because the ratio
    p-value inverts this bound many times.
    """
    _check(alpha)
    if n < 1 or not 0 <= x <= n:
        raise MetricError(f"a proportion needs 0 <= x <= n and n >= 1, got {x} of {n}")
    if side == LESS:
        return 1.0 if x == n else float(beta.ppf(1 - alpha, x + 1, n - x))
    return 0.0 if x == 0 else float(beta.ppf(alpha, x, n - x + 1))


def binom_p(x: int, n: int, threshold: float, side: str) -> float:
    """Exact binomial p-value for H1 'p < threshold' (side 'less') or 'p > threshold'."""
    if side == LESS:
        return float(binom.cdf(x, n, threshold))
    return float(binom.sf(x - 1, n, threshold))


def proportion(x: int, n: int, threshold: float, alpha: float, side: str) -> Bound:
    """Bound and exact p-value of the proportion x / n against ``threshold``."""
    return Bound(x / n, cp_bound(x, n, alpha, side), binom_p(x, n, threshold, side),
                 "Clopper-Pearson")


def ratio_bound(xa: int, na: int, xb: int, nb: int, alpha: float, side: str) -> float:
    if side == GREATER:  # arm as low as it may be, baseline as high
        den = cp_bound(xb, nb, alpha / 2, LESS)
        return cp_bound(xa, na, alpha / 2, GREATER) / den if den > 0 else 0.0
    den = cp_bound(xb, nb, alpha / 2, GREATER)
    return cp_bound(xa, na, alpha / 2, LESS) / den if den > 0 else math.inf


def _passes(value: float, threshold: float, side: str) -> bool:
    return value < threshold if side == LESS else value > threshold


def _invert(passes_at: Callable[[float], bool]) -> float:
    """Smallest level in (0, 0.5) at which a monotone test passes (its p-value); 1 if none."""
    low, high = 1e-12, 0.4999
    if not passes_at(high):
        return 1.0
    if passes_at(low):
        return low
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (low, mid) if passes_at(mid) else (mid, high)
    return high


def proportion_ratio(xa: int, na: int, xb: int, nb: int, threshold: float, alpha: float,
                     side: str) -> Bound:
    """Bound on (xa / na) / (xb / nb) from Bonferroni-split Clopper-Pearson bounds.

    With probability >= 1 - alpha both single bounds hold, hence their ratio bounds the true
    ratio; the p-value is the smallest level at which that bound clears ``threshold``.
    """
    if xb == 0:
        raise MetricError("the baseline rate is 0; a ratio to it is undefined")
    value = ratio_bound(xa, na, xb, nb, alpha, side)
    p = _invert(lambda a: _passes(ratio_bound(xa, na, xb, nb, a, side), threshold, side))
    return Bound((xa / na) / (xb / nb), value, p, "Clopper-Pearson ratio (Bonferroni)")


def min_n(passes: Callable[[int], bool]) -> int | None:
    """Smallest n for which ``passes(n)`` (the most favourable data of size n) holds.

    ``passes`` must be monotone in n; None when even MAX_N samples cannot pass.
    """
    if not passes(MAX_N):
        return None
    low, high = 1, MAX_N
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if not passes(mid) else (low, mid)
    return low


def proportion_min_n(threshold: float, alpha: float, side: str) -> int | None:
    """Smallest n at which 0 of n (side 'less') or n of n ('greater') clears ``threshold``."""
    def ok(n: int) -> bool:
        return _passes(cp_bound(0 if side == LESS else n, n, alpha, side), threshold, side)
    return min_n(ok)


def ratio_min_n(threshold: float, alpha: float, side: str) -> int | None:
    """Smallest n at which the best paired data (arm 0 or n of n, baseline n of n) passes."""
    def ok(n: int) -> bool:
        xa = 0 if side == LESS else n
        return _passes(ratio_bound(xa, n, n, n, alpha, side), threshold, side)
    return min_n(ok)


# --- bootstrap ------------------------------------------------------------------------------

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Resamples:
    """A BCa-ready bootstrap: the estimate, resampled values, bias and acceleration."""

    estimate: float
    distribution: np.ndarray
    z0: float
    acc: float

    @property
    def zero_width(self) -> bool:
        return bool(np.ptp(self.distribution) == 0)

    def quantile_level(self, alpha: float, side: str) -> float:
        """BCa-adjusted level of the one-sided (1 - alpha) bound (Efron 1987, eq. 2.3)."""
        z = norm.ppf(1 - alpha) * (1 if side == LESS else -1)
        w = self.z0 + z
        return float(norm.cdf(self.z0 + w / (1 - self.acc * w)))

    def bound(self, alpha: float, side: str) -> float:
        return float(np.quantile(self.distribution, self.quantile_level(alpha, side)))

    def pvalue(self, threshold: float, side: str) -> float:
        """Smallest alpha at which the BCa bound clears ``threshold`` (bisection), never
        below 1 / (B + 1): B resamples cannot resolve a smaller p-value. Zero width (every
        resample gave one value, e.g. an arm equal to the baseline on every text): that value
        decides, at the smallest resolvable p-value or 1."""
        floor = 1.0 / (self.distribution.size + 1)
        if self.zero_width:
            return floor if _passes(float(self.distribution.flat[0]), threshold, side) else 1.0
        p = _invert(lambda a: _passes(self.bound(a, side), threshold, side))
        return max(p, floor)

    def test(self, threshold: float, alpha: float, side: str) -> Bound:
        return Bound(self.estimate, self.bound(alpha, side), self.pvalue(threshold, side),
                     "BCa bootstrap", self.zero_width)


def _draw(n: int, strata: np.ndarray | None, n_boot: int, rng) -> np.ndarray:
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    # Resampling within strata keeps every resample's class sizes (members and non-members
    # for an AUC), so no resample leaves the statistic undefined.
    idx = np.empty((n_boot, n), dtype=np.int64)
    for value in np.unique(strata):
        where = np.flatnonzero(strata == value)
        idx[:, where] = where[rng.integers(0, where.size, size=(n_boot, where.size))]
    return idx


def _apply(statistic: Statistic, idx: np.ndarray) -> np.ndarray:
    parts = [np.asarray(statistic(idx[i:i + 512]), dtype=np.float64)
             for i in range(0, len(idx), 512)]
    return np.concatenate(parts)


def _acceleration(statistic: Statistic, n: int) -> float:
    """Jackknife acceleration; 0 when every leave-one-out value is equal."""
    loo = np.array([np.delete(np.arange(n), i) for i in range(n)])
    jack = _apply(statistic, loo)
    dev = jack.mean() - jack
    den = 6.0 * (dev ** 2).sum() ** 1.5
    return float((dev ** 3).sum() / den) if den > 0 and np.isfinite(den) else 0.0


def bca(n: int, statistic: Statistic, n_boot: int, seed: int,
        strata: Sequence[int] | np.ndarray | None = None) -> Resamples:
    """Bootstrap ``statistic`` (index array ``(..., m)`` -> ``(...)``) over ``n`` samples."""
    if n < 2:
        raise MetricError(f"a bootstrap needs at least 2 samples, got {n}")
    estimate = float(statistic(np.arange(n)))
    if not math.isfinite(estimate):
        raise MetricError("the statistic is undefined on the full sample")
    rng = np.random.default_rng(seed)
    groups = None if strata is None else np.asarray(strata)
    dist = _apply(statistic, _draw(n, groups, n_boot, rng))
    if not np.isfinite(dist).all():
        bad = int((~np.isfinite(dist)).sum())
        raise MetricError(f"the statistic is undefined in {bad} of {n_boot} resamples")
    # Ties at the estimate count half, and the share is kept off 0 and 1, so z0 stays finite.
    share = ((dist < estimate).sum() + 0.5 * (dist == estimate).sum()) / n_boot
    share = min(max(share, 0.5 / n_boot), 1 - 0.5 / n_boot)
    return Resamples(estimate, dist, float(norm.ppf(share)), _acceleration(statistic, n))
