"""Parallel-sentence retrieval from pooled hidden states: does the model still map a language's
meaning onto the pivot language's representation?

Each language's sentence vectors are centred on that language's own mean first: a language's
mean vector is shared by all its sentences and says "this is Hindi", not what a sentence means,
and left in it dominates every cosine. Removing the per-language mean is the centring of Libovicky
et al. 2020 ("On the language neutrality of pre-trained multilingual representations").
Then, for sentence i of the query language, every pivot sentence is ranked by cosine
similarity; the aligned one (row i) should come first.

Ranks are pessimistic on ties: ``rank_i = 1 + #{j != i : cos(q_i, p_j) >= cos(q_i, p_i)}``, so
constant (collapsed) representations rank last, never first. Top-1 is the share of rank 1, MRR the
mean of 1 / rank. By chance top-1 is 1/n and MRR is H_n / n (H_n the n-th harmonic number).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from mmie.core.errors import MetricError


def _matrix(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise MetricError(f"{name}: expected [sentences >= 2, features], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MetricError(f"{name}: {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr


def cosine_matrix(query, pivot, centre: bool = True) -> np.ndarray:
    """``[n, n]`` cosine similarities of (per-language centred) query and pivot rows.

    A row that is all zero after centring has cosine 0 with everything (no direction at all).
    """
    q, p = _matrix(query, "query"), _matrix(pivot, "pivot")
    if q.shape != p.shape:
        raise MetricError(f"query and pivot must be line-aligned with equal widths: "
                          f"{q.shape} != {p.shape}")
    if centre:
        q, p = q - q.mean(0, keepdims=True), p - p.mean(0, keepdims=True)
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)  # noqa: E731
    return unit(q) @ unit(p).T


def aligned_ranks(sim: np.ndarray) -> np.ndarray:
    """1-based rank of the aligned pivot (the diagonal) in each row, ties counted against it."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise MetricError(f"similarities must be square [n, n], got shape {sim.shape}")
    diag = np.diag(sim)[:, None]
    at_least = (sim >= diag).sum(axis=1)  # counts the diagonal itself once
    return at_least.astype(np.int64)


@dataclass(frozen=True)
class Retrieval:
    """Top-1 accuracy and MRR of retrieving the aligned pivot sentence, with chance levels."""

    n: int
    top1: float
    mrr: float
    chance_top1: float
    chance_mrr: float

    def to_dict(self) -> dict:
        return asdict(self)


def chance_mrr(n: int) -> float:
    """Expected MRR when the aligned sentence's rank is uniform on 1..n: H_n / n."""
    return float(sum(1.0 / k for k in range(1, n + 1)) / n)


def retrieval(ranks: np.ndarray) -> Retrieval:
    """Top-1 and MRR from the aligned ranks of every query sentence."""
    ranks = np.asarray(ranks)
    n = int(ranks.size)
    return Retrieval(n, float((ranks == 1).mean()), float((1.0 / ranks).mean()), 1.0 / n,
                     chance_mrr(n))


def retrieve(query, pivot, centre: bool = True) -> tuple[Retrieval, np.ndarray]:
    """:class:`Retrieval` of ``query`` rows against line-aligned ``pivot`` rows, plus the ranks."""
    ranks = aligned_ranks(cosine_matrix(query, pivot, centre))
    return retrieval(ranks), ranks
