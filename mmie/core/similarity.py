"""Representation similarity and separability metrics for comparing layers.

Every metric takes activations as ``[n_samples, n_features]`` (numpy arrays or torch tensors),
works in float64, and raises :class:`MetricError` with a plain message for inputs it cannot
judge (NaN/inf, constant activations, mismatched rows, too few samples), so callers never see
a deep numpy or sklearn traceback.

Paired metrics (CKA, Procrustes, ANC) need the rows of ``X`` and ``Y`` to be the same inputs
(e.g. parallel sentences); ``probe_auc`` compares two unpaired groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mmie.core.errors import MetricError
from mmie.core.registry import Registry


def _as_matrix(x, name: str) -> np.ndarray:
    """A finite 2-D float64 array, or a MetricError naming the input."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise MetricError(f"{name}: expected a 2-D [samples, features] array, got shape "
                          f"{arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise MetricError(f"{name}: needs at least 2 samples and 1 feature, got shape "
                          f"{arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise MetricError(f"{name}: {bad} NaN/inf values")
    return arr


def _centered(x, name: str) -> np.ndarray:
    """Column-centred copy; all-constant activations make every similarity undefined."""
    arr = _as_matrix(x, name)
    # ptp on the raw values is exact; a norm after centring would need a scale-aware epsilon.
    if np.ptp(arr, axis=0).max() == 0:
        raise MetricError(f"{name}: activations are constant (zero variance); "
                          "the similarity is undefined")
    return arr - arr.mean(axis=0, keepdims=True)


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    a, b = _centered(x, "X"), _centered(y, "Y")
    if a.shape[0] != b.shape[0]:
        raise MetricError(f"X and Y must have the same rows (paired samples): "
                          f"{a.shape[0]} != {b.shape[0]}")
    return a, b


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019): HSIC(X,Y) / sqrt(HSIC(X,X) HSIC(Y,Y))."""
    a, b = _paired(x, y)
    cross = np.linalg.norm(a.T @ b) ** 2
    return float(cross / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def _unbiased_hsic(kx: np.ndarray, ky: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC estimator on Gram matrices with zeroed diagonals."""
    n = kx.shape[0]
    sum_x, sum_y = kx.sum(axis=0), ky.sum(axis=0)
    trace = float((kx * ky).sum())
    total = float(sum_x.sum() * sum_y.sum()) / ((n - 1) * (n - 2))
    cross = 2.0 * float(sum_x @ sum_y) / (n - 2)
    return (trace + total - cross) / (n * (n - 3))


def _gram(a: np.ndarray) -> np.ndarray:
    k = a @ a.T
    np.fill_diagonal(k, 0.0)
    return k


def debiased_cka(x, y) -> float:
    """CKA from the unbiased HSIC estimator (Nguyen et al. 2021): ~0 for independent data.

    Plain linear CKA is biased upwards when features outnumber samples; this version is not,
    which matters when comparing layers of wide models on a few hundred texts.
    """
    a, b = _paired(x, y)
    if a.shape[0] < 4:
        raise MetricError(f"debiased CKA needs at least 4 samples, got {a.shape[0]}")
    kx, ky = _gram(a), _gram(b)
    self_x, self_y = _unbiased_hsic(kx, kx), _unbiased_hsic(ky, ky)
    if self_x <= 0 or self_y <= 0:
        raise MetricError("debiased CKA is undefined: the unbiased self-HSIC is not positive "
                          "(too few samples for the feature variance)")
    return float(_unbiased_hsic(kx, ky) / np.sqrt(self_x * self_y))


def _row_space(a: np.ndarray) -> np.ndarray:
    """An [n, r] matrix with the same Gram matrix as ``a``; keeps the SVD small for wide data."""
    if a.shape[1] <= a.shape[0]:
        return a
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    return u * s


def procrustes_similarity(x, y) -> float:
    """1 - (orthogonal Procrustes distance)^2 / 2 on centred, unit-Frobenius data.

    That equals the nuclear norm of X^T Y: 1 for a rotated (or scaled) copy, ~0 for unrelated
    data. Columns may differ in number.
    """
    a, b = _paired(x, y)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    # Replacing X by a matrix with the same Gram matrix leaves ||X^T Y||_* unchanged.
    singular = np.linalg.svd(_row_space(a).T @ _row_space(b), compute_uv=False)
    return float(singular.sum())


def anc(x, y) -> float:
    """Mean absolute Pearson correlation of matched neurons (column j of X with column j of Y)."""
    a, b = _paired(x, y)
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"ANC matches neurons one to one: X has {a.shape[1]} columns, "
                          f"Y has {b.shape[1]}")
    # Centring keeps a constant column constant, so ptp == 0 finds it exactly.
    dead = int(((np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)).sum())
    if dead:
        raise MetricError(f"ANC is undefined: {dead} neuron(s) are constant in X or Y")
    corr = (a * b).sum(axis=0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    return float(np.abs(corr).mean())


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated linear probe separating two groups of activations.

    auc: mean ROC AUC over folds (0.5 = inseparable, 1 = perfectly separable).
    auc_std: standard deviation of the fold AUCs.
    folds: number of stratified folds used.
    """

    auc: float
    auc_std: float
    folds: int


def _probe_inputs(x_pos, x_neg, folds: int) -> tuple[np.ndarray, np.ndarray]:
    if folds < 2:
        raise MetricError(f"probe needs at least 2 folds, got {folds}")
    pos, neg = _as_matrix(x_pos, "X_pos"), _as_matrix(x_neg, "X_neg")
    if pos.shape[1] != neg.shape[1]:
        raise MetricError(f"X_pos and X_neg have different widths: {pos.shape[1]} != "
                          f"{neg.shape[1]}")
    if min(len(pos), len(neg)) < folds:
        raise MetricError(f"probe with {folds} folds needs at least {folds} samples per class, "
                          f"got {len(pos)} positive and {len(neg)} negative")
    data = np.concatenate([pos, neg])
    if np.ptp(data, axis=0).max() == 0:
        raise MetricError("probe is undefined: activations are constant across all samples")
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return data, labels


def probe_auc(x_pos, x_neg, folds: int = 5, seed: int = 0) -> ProbeResult:
    """ROC AUC of a standardised logistic-regression probe, stratified k-fold (shuffled, seeded).

    Scaling is fitted inside each training fold (a Pipeline), so no test statistics leak in.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data, labels = _probe_inputs(x_pos, x_neg, folds)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(probe, data, labels, cv=splitter, scoring="roc_auc",
                             error_score="raise")
    return ProbeResult(auc=float(scores.mean()), auc_std=float(scores.std()), folds=folds)


@dataclass(frozen=True)
class LayerMetric:
    """A named layer metric.

    fn: ``(X, Y) -> float``.
    paired: True when rows of X and Y must be the same inputs (e.g. parallel sentences).
    description: one line for help texts and reports.
    """

    name: str
    fn: Callable[..., float]
    paired: bool
    description: str


LAYER_METRICS: Registry[LayerMetric] = Registry("layer metric")


def register_metric(name: str, *, paired: bool, description: str):
    """Decorator adding ``fn`` to :data:`LAYER_METRICS` under ``name``."""

    def add(fn: Callable[..., float]) -> Callable[..., float]:
        LAYER_METRICS.add(name, LayerMetric(name, fn, paired, description))
        return fn

    return add


def get_metric(name: str) -> LayerMetric:
    """The registered metric ``name``, or a MetricError listing the known ones."""
    try:
        return LAYER_METRICS[name]
    except KeyError:
        known = ", ".join(sorted(LAYER_METRICS))
        raise MetricError(f"unknown layer metric '{name}' (known: {known})") from None


register_metric("linear_cka", paired=True, description="linear CKA")(linear_cka)
register_metric("debiased_cka", paired=True,
                description="CKA with the unbiased HSIC estimator")(debiased_cka)
register_metric("procrustes", paired=True,
                description="orthogonal Procrustes similarity")(procrustes_similarity)
register_metric("anc", paired=True,
                description="average |Pearson r| of matched neurons")(anc)


@register_metric("probe_auc", paired=False,
                 description="cross-validated linear probe ROC AUC separating X from Y")
def _probe_auc_metric(x, y) -> float:
    return probe_auc(x, y).auc
