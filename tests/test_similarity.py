"""Similarity metrics: exact values on constructed data and refusal of bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from mmie.core.errors import MetricError
from mmie.core.similarity import (
    LAYER_METRICS,
    ProbeResult,
    anc,
    debiased_cka,
    get_metric,
    linear_cka,
    probe_auc,
    procrustes_similarity,
)


@pytest.fixture
def acts() -> np.ndarray:
    # Correlated features, so an orthogonal map really changes the coordinates.
    rng = np.random.default_rng(0)
    return rng.normal(size=(120, 16)) @ rng.normal(size=(16, 16))


@pytest.fixture
def rotation() -> np.ndarray:
    return ortho_group.rvs(16, random_state=1)


@pytest.mark.parametrize("metric", [linear_cka, debiased_cka, procrustes_similarity, anc])
def test_identical_inputs_score_one(metric, acts):
    assert metric(acts, acts) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("metric", [linear_cka, debiased_cka, procrustes_similarity])
def test_invariant_to_rotation_and_isotropic_scaling(metric, acts, rotation):
    assert metric(acts, 3.5 * acts @ rotation) == pytest.approx(1.0, abs=1e-9)
    other = np.random.default_rng(5).normal(size=acts.shape)
    assert metric(acts, other) == pytest.approx(metric(acts @ rotation, 0.2 * other), abs=1e-9)


def test_anc_is_not_rotation_invariant(acts, rotation):
    # ANC matches neurons one to one, so rotating the basis must lower it.
    assert anc(acts, acts @ rotation) < 0.9


def test_debiased_cka_near_zero_for_independent_data():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(500, 64)), rng.normal(size=(500, 64))
    assert abs(debiased_cka(x, y)) < 0.05
    # The biased estimator is pulled well above zero in the same setting.
    assert linear_cka(x, y) > 0.05


def test_accepts_torch_tensors(acts):
    tensor = torch.from_numpy(acts).float()
    assert linear_cka(tensor, tensor) == pytest.approx(1.0, abs=1e-6)


def test_procrustes_handles_wide_data_and_different_widths():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 200))
    wide_copy = np.concatenate([x, np.zeros((20, 30))], axis=1)
    assert procrustes_similarity(x, wide_copy) == pytest.approx(1.0, abs=1e-9)
    assert procrustes_similarity(x, rng.normal(size=(20, 50))) < 0.95


def test_probe_auc_chance_for_one_distribution():
    rng = np.random.default_rng(6)
    result = probe_auc(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)), folds=5, seed=0)
    assert isinstance(result, ProbeResult)
    assert 0.35 < result.auc < 0.65
    assert result.folds == 5 and result.auc_std >= 0


def test_probe_auc_separable():
    rng = np.random.default_rng(7)
    pos = rng.normal(size=(60, 8)) + 4.0
    neg = rng.normal(size=(60, 8))
    assert probe_auc(pos, neg).auc > 0.99


def test_probe_auc_is_deterministic_for_a_seed():
    rng = np.random.default_rng(8)
    pos, neg = rng.normal(size=(40, 4)) + 0.5, rng.normal(size=(40, 4))
    assert probe_auc(pos, neg, seed=3) == probe_auc(pos, neg, seed=3)


@pytest.mark.parametrize("metric", [linear_cka, debiased_cka, procrustes_similarity, anc])
def test_bad_inputs_raise_metric_error(metric, acts):
    with_nan = acts.copy()
    with_nan[3, 2] = np.nan
    with pytest.raises(MetricError, match="NaN"):
        metric(with_nan, acts)
    with pytest.raises(MetricError, match="constant"):
        metric(np.ones_like(acts), acts)
    with pytest.raises(MetricError, match="same rows"):
        metric(acts, acts[:-1])
    with pytest.raises(MetricError, match="2-D"):
        metric(acts[0], acts[0])


def test_anc_refuses_dead_neurons_and_width_mismatch(acts):
    dead = acts.copy()
    dead[:, 4] = 0.1
    with pytest.raises(MetricError, match="1 neuron"):
        anc(dead, acts)
    with pytest.raises(MetricError, match="columns"):
        anc(acts, acts[:, :8])


def test_probe_bad_inputs_raise_metric_error():
    rng = np.random.default_rng(9)
    pos, neg = rng.normal(size=(4, 3)), rng.normal(size=(30, 3))
    with pytest.raises(MetricError, match="at least 5 samples per class"):
        probe_auc(pos, neg, folds=5)
    with pytest.raises(MetricError, match="widths"):
        probe_auc(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))
    with pytest.raises(MetricError, match="constant"):
        probe_auc(np.zeros((10, 3)), np.zeros((10, 3)))
    inf = rng.normal(size=(10, 3))
    inf[0, 0] = np.inf
    with pytest.raises(MetricError, match="NaN/inf"):
        probe_auc(inf, rng.normal(size=(10, 3)))


def test_debiased_cka_needs_four_samples():
    with pytest.raises(MetricError, match="at least 4"):
        debiased_cka(np.arange(6.0).reshape(3, 2) ** 2, np.arange(6.0).reshape(3, 2))


def test_registry_lists_metrics_and_names_unknown(acts):
    assert {"linear_cka", "debiased_cka", "procrustes", "anc", "probe_auc"} <= set(LAYER_METRICS)
    assert get_metric("linear_cka").fn(acts, acts) == pytest.approx(1.0)
    assert get_metric("probe_auc").paired is False
    with pytest.raises(MetricError, match="unknown layer metric 'cca'.*linear_cka"):
        get_metric("cca")
