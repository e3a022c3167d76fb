"""One-sided bounds and their p-values (mmie.core.bounds), against hand values and statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from mmie.core import bounds
from mmie.core.errors import MetricError


@pytest.mark.parametrize("x, n", [(0, 16), (3, 16), (16, 16), (5, 160), (150, 160)])
def test_cp_bound_equals_statsmodels_at_twice_alpha(x, n):
    low, high = proportion_confint(x, n, alpha=0.10, method="beta")
    assert bounds.cp_bound(x, n, 0.05, "less") == pytest.approx(high, abs=1e-12)
    assert bounds.cp_bound(x, n, 0.05, "greater") == pytest.approx(low, abs=1e-12)


def test_zero_of_n_has_the_closed_form_upper_bound():
    # 0 of n: the upper bound solves (1 - p)^n = alpha.
    assert bounds.cp_bound(0, 16, 0.05, "less") == pytest.approx(1 - 0.05 ** (1 / 16))
    assert bounds.cp_bound(0, 16, 0.05, "less") > 0.17  # the example: never 0
    assert bounds.proportion_min_n(0.05, 0.05, "less") == 59
    assert bounds.proportion_min_n(0.8, 0.05, "greater") == 14
    assert (1 - 0.05) ** 59 <= 0.05 < (1 - 0.05) ** 58


def test_exact_p_value_matches_the_bound():
    for x in range(0, 12):
        b = bounds.proportion(x, 100, 0.05, 0.05, "less")
        assert (b.value < 0.05) == (b.p < 0.05)  # duality of bound and test


def test_ratio_bound_is_the_bonferroni_split():
    value = bounds.ratio_bound(90, 100, 95, 100, 0.05, "greater")
    expected = (bounds.cp_bound(90, 100, 0.025, "greater")
                / bounds.cp_bound(95, 100, 0.025, "less"))
    assert value == pytest.approx(expected)
    res = bounds.proportion_ratio(90, 100, 95, 100, 0.8, 0.05, "greater")
    assert res.estimate == pytest.approx(90 / 95) and res.value > 0.8 and res.p < 0.05
    with pytest.raises(MetricError, match="baseline rate is 0"):
        bounds.proportion_ratio(1, 10, 0, 10, 0.5, 0.05, "less")
    assert bounds.ratio_min_n(0.9, 0.05, "greater") == math.ceil(math.log(0.025) / math.log(0.9))


def test_bca_bound_and_p_value_agree():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 0.5, 80)
    res = bounds.bca(80, lambda idx: values[idx].mean(-1), 2000, seed=1)
    upper = res.bound(0.05, "less")
    assert res.estimate < upper < res.estimate + 0.2
    for threshold in (upper - 0.01, upper + 0.01):
        assert (res.pvalue(threshold, "less") < 0.05) == (upper < threshold)


def test_bca_strata_keep_both_classes_in_every_resample():
    labels = np.r_[np.ones(3), np.zeros(30)]
    res = bounds.bca(33, lambda idx: labels[idx].mean(-1), 300, seed=0, strata=labels)
    assert np.allclose(res.distribution, 3 / 33)  # the class sizes never change
    assert res.zero_width


def test_bca_refuses_too_few_or_undefined():
    with pytest.raises(MetricError, match="at least 2"):
        bounds.bca(1, lambda idx: np.zeros(np.shape(idx)[:-1]), 100, 0)
    with pytest.raises(MetricError, match="undefined on the full sample"):
        bounds.bca(5, lambda idx: np.full(np.shape(idx)[:-1], np.nan), 100, 0)
