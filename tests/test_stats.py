"""Bootstrap intervals, bootstrap p-values, BH correction and seed aggregation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mmie.core.errors import MetricError
from mmie.core.stats import (
    CI,
    auc_statistic,
    bh_adjust,
    bootstrap_ci,
    bootstrap_mean,
    bootstrap_pvalue,
    bootstrap_statistic,
    paired_bootstrap_ci,
    paired_pvalue,
    seed_level_bootstrap,
    seed_summary,
)


def test_bca_interval_covers_true_mean_at_nominal_rate():
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    hits = 0
    for rep in range(200):
        ci = bootstrap_ci(rng.normal(2.0, 1.5, size=40), n_boot=1000, alpha=0.05, seed=rep)
        hits += ci.low <= 2.0 <= ci.high
    assert hits >= 180, f"coverage {hits / 200:.2f} below 0.90"
    assert time.perf_counter() - start < 30


def test_interval_is_not_rounded_to_two_decimals():
    values = np.random.default_rng(1).normal(size=30) / 1000
    ci = bootstrap_ci(values, n_boot=500, seed=0)
    assert ci.low != round(ci.low, 2) and ci.high != round(ci.high, 2)
    assert ci.low < ci.estimate < ci.high and ci.method == "bca"


def test_same_seed_same_interval_other_seed_differs():
    values = np.random.default_rng(2).normal(size=50)
    assert bootstrap_ci(values, n_boot=500, seed=7) == bootstrap_ci(values, n_boot=500, seed=7)
    assert bootstrap_ci(values, n_boot=500, seed=7) != bootstrap_ci(values, n_boot=500, seed=8)


def test_constant_values_give_a_point_interval():
    ci = bootstrap_ci(np.zeros(10), n_boot=200)
    assert ci == CI(0.0, 0.0, 0.0, "constant")


@pytest.mark.parametrize("values, message", [
    ([1.0], "at least 2 values"),
    ([], "at least 2 values"),
    ([1.0, float("nan"), 2.0], "NaN"),
    ([[1.0, 2.0], [3.0, 4.0]], "1-D"),
])
def test_bad_values_refused(values, message):
    with pytest.raises(MetricError, match=message):
        bootstrap_ci(values, n_boot=100)


def test_bad_settings_refused():
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0, 3.0], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0, 3.0], n_boot=0)


def test_paired_interval_is_interval_of_differences():
    rng = np.random.default_rng(3)
    a = rng.normal(size=40)
    b = a - 0.5 + rng.normal(scale=0.1, size=40)
    ci = paired_bootstrap_ci(a, b, n_boot=1000, seed=0)
    assert ci == bootstrap_ci(a - b, n_boot=1000, seed=0)
    assert 0.4 < ci.low < 0.5 < ci.high < 0.6
    with pytest.raises(MetricError, match="differ in length"):
        paired_bootstrap_ci(a, b[:-1])


def test_one_sided_pvalue_small_for_clear_effect_large_otherwise():
    a, b = np.ones(50), np.r_[np.zeros(45), np.ones(5)]
    # Mean difference 0.9 with SE ~0.042: far above 0.3, no evidence above 0.9 itself,
    # about 2.4 SE below 1.0.
    assert paired_pvalue(a, b, 0.3, "greater", n_boot=2000) == pytest.approx(1 / 2001)
    assert paired_pvalue(a, b, 0.9, "greater", n_boot=2000) > 0.4
    assert paired_pvalue(a, b, 1.0, "less", n_boot=2000) < 0.05


def test_bootstrap_pvalue_counts_shifted_resamples():
    # estimate 1, threshold 0: resamples with theta* - 1 >= 1 (i.e. theta* >= 2) count.
    dist = np.array([0.0, 1.0, 2.0, 3.0])
    assert bootstrap_pvalue(dist, 1.0, 0.0, "greater") == pytest.approx((1 + 2) / 5)
    assert bootstrap_pvalue(dist, 1.0, 2.0, "less") == pytest.approx((1 + 1) / 5)
    with pytest.raises(MetricError):
        bootstrap_pvalue(np.array([np.nan, 1.0]), 1.0, 0.0, "greater")


def test_bootstrap_statistic_ratio_of_sums():
    rng = np.random.default_rng(4)
    num, den = rng.uniform(1, 2, 60), rng.uniform(1, 2, 60)

    def ratio(idx):
        return num[idx].sum(-1) / den[idx].sum(-1)

    boot = bootstrap_statistic(60, ratio, n_boot=1000, seed=0)
    assert boot.ci.estimate == pytest.approx(num.sum() / den.sum())
    assert boot.ci.low < boot.ci.estimate < boot.ci.high
    assert boot.distribution.shape == (1000,)


def test_bootstrap_statistic_refuses_undefined_resamples():
    labels = np.r_[np.ones(2), np.zeros(8)]

    def positives_share_of_first(idx):  # undefined when a resample has no positive
        return labels[idx].sum(-1) / labels[idx].sum(-1)

    with pytest.raises(MetricError, match="undefined in"):
        bootstrap_statistic(10, positives_share_of_first, n_boot=500, seed=0)


def test_bh_adjust_matches_hand_computation():
    # p = [0.01, 0.04, 0.03, 0.005], m = 4. Sorted: 0.005 (rank 1), 0.01 (2), 0.03 (3), 0.04 (4).
    # p * m / rank: 0.02, 0.02, 0.04, 0.04; running minimum from the largest rank down keeps
    # 0.04, 0.04, 0.02, 0.02. Back in input order: [0.02, 0.04, 0.04, 0.02].
    adjusted = bh_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.02, 0.04, 0.04, 0.02])


def test_bh_adjust_refuses_nan_and_out_of_range():
    with pytest.raises(MetricError, match="NaN p-value"):
        bh_adjust([0.01, float("nan")])
    with pytest.raises(MetricError, match=r"\[0, 1\]"):
        bh_adjust([0.01, 1.2])
    assert bh_adjust([]).size == 0


def test_seed_aggregation():
    summary = seed_summary({2: 0.6, 1: 0.4})
    assert summary.mean == pytest.approx(0.5) and summary.n_seeds == 2
    assert summary.sd == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert list(summary.values) == [1, 2]
    assert seed_summary({0: 0.3}).sd == 0.0
    with pytest.raises(MetricError, match="NaN"):
        seed_summary({0: float("nan")})
    boot = seed_level_bootstrap({0: 0.5, 1: 0.6, 2: 0.9}, n_boot=500, seed=0)
    assert 0.5 <= boot.ci.low <= boot.ci.estimate <= boot.ci.high <= 0.9
    with pytest.raises(MetricError, match="at least 2 seeds"):
        seed_level_bootstrap({0: 0.5})


def test_bootstrap_mean_distribution_is_reused_for_pvalues():
    boot = bootstrap_mean(np.r_[np.ones(40), np.zeros(10)], n_boot=1000, seed=0)
    assert boot.pvalue(0.5, "greater") < 0.01
    assert boot.pvalue(0.95, "less") < 0.05
    assert boot.pvalue(0.5, "less") > 0.9


def test_auc_statistic_matches_sklearn_with_ties_and_resamples():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    stat = auc_statistic(scores, labels)
    assert stat(np.arange(40)) == pytest.approx(roc_auc_score(labels, scores))
    idx = rng.integers(0, 40, size=(3, 40))
    expected = [roc_auc_score(labels[row], scores[row]) for row in idx]
    np.testing.assert_allclose(stat(idx), expected)
    # Hand example: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> 3 of 4 pairs ordered.
    assert auc_statistic([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])(np.arange(4)) == 0.75
    assert np.isnan(auc_statistic([0.1, 0.2], [1, 1])(np.arange(2)))
