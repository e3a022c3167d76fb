"""Depth metrics shared by `relearn` / `comprehension` (which record them) and `gate` (which
tests them). One definition each.

- Recovery fraction of a relearning attack (the adversarial-relearning measure of Lucki et al.
  2024, "An adversarial perspective on machine unlearning for AI safety"; Deeb & Roger 2024):
  ``(m_arm(0) - m_arm(k)) / (m_arm(0) - m_base)`` for a metric m on held-out forget texts,
  0 = nothing came back, 1 = back to the base model. NaN where the arm removed nothing.
- Retrieval ratio: the arm's top-1 parallel-sentence retrieval over the base model's, for the
  forget language at one block; near 1 = the meaning mapping survived, near 0 = gone.
"""

from __future__ import annotations

import numpy as np


def ratio_of_sums(num: np.ndarray, den: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """``sum(num[idx]) / sum(den[idx])`` over the last axis of ``idx`` (all texts when None):
    a per-token mean over texts, resampled by whole texts."""
    idx = np.arange(len(num)) if idx is None else np.asarray(idx)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num[idx].sum(-1) / den[idx].sum(-1)


def recovery_fraction(before, after, base) -> np.ndarray:
    """The module's formula on metric values (arrays broadcast); NaN where nothing was removed."""
    before, after, base = (np.asarray(v, dtype=np.float64) for v in (before, after, base))
    removed = before - base
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (before - after) / removed
    return np.where(removed == 0, np.nan, out)


def retrieval_ratio(arm_top1: float, base_top1: float) -> float | None:
    """Arm top-1 / base top-1 on the same sentences (rates or hit counts alike); None when the
    base model retrieves none."""
    return arm_top1 / base_top1 if base_top1 else None
