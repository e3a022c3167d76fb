"""Gradient difference: gradient ascent on forget text plus a retain loss (Liu et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from mmie.unlearn.objectives.base import (
    _check_positive,
    register_objective,
)
from mmie.unlearn.objectives.ga import GradientAscent


@dataclass(frozen=True)
class GradDiffConfig:
    retain_weight: float = 1.0  # weight of the retain loss next to the GA term (> 0)

    def __post_init__(self):
        _check_positive("retain_weight", self.retain_weight)


@register_objective("graddiff")
class GradDiff(GradientAscent):
    """Gradient difference: ascend on forget, descend on retain."""

    config_class = GradDiffConfig
