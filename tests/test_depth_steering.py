"""Steering recovery: the added direction is exactly what is added; rates count detections."""

from __future__ import annotations

import pytest
import torch

from mmie.core.activations import harvest
from mmie.core.generation import GenerationSettings
from mmie.core.models import ModelSpec, loaded
from mmie.depth.steering import (
    SteeringConfig,
    forget_rate,
    steered,
    steering_direction,
    steering_recovery,
)
from tests.conftest import EN, HI

TINY = ModelSpec(name="tiny:llama", device="cpu")


def test_direction_is_the_difference_of_pooled_means_and_steering_adds_it():
    with loaded(TINY) as lm:
        direction = steering_direction(lm, HI[:4], EN[:4], 1)
        pooled = harvest(lm, HI[:4] + EN[:4], [1], token_sample=0).pooled[1]
        assert torch.allclose(direction, pooled[:4].mean(0) - pooled[4:].mean(0), atol=1e-5)
        assert torch.count_nonzero(steering_direction(lm, EN[:3], EN[:3], 1)) == 0
        before = harvest(lm, EN[:3], [1], token_sample=0).pooled[1]
        with steered(lm, 1, direction, 2.0):
            after = harvest(lm, EN[:3], [1], token_sample=0).pooled[1]
        assert torch.allclose(after - before, 2.0 * direction.expand_as(before), atol=1e-4)
        assert torch.equal(harvest(lm, EN[:3], [1], token_sample=0).pooled[1], before)


def test_forget_rate_counts_detected_languages():
    assert forget_rate([HI[0], EN[0], HI[1], EN[1]], "hi") == pytest.approx(0.5)


def test_steering_recovery_reports_a_rate_per_scale():
    config = SteeringConfig(forget_train=tuple(HI[:4]), replacement_train=tuple(EN[:4]),
                            prompts=tuple(EN[4:7]), layer=1, scales=(0.0, 4.0),
                            settings=GenerationSettings(max_new_tokens=6))
    got = steering_recovery(config, TINY)
    assert got["arm"] == "base" and [r["scale"] for r in got["rates"]] == [0.0, 4.0]
    assert all(0 <= r["forget_rate"] <= 1 and r["n"] == 3 for r in got["rates"])
