"""Representation Misdirection for Unlearning (Li et al. 2024, WMDP, arXiv:2403.03218)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from mmie.unlearn.objectives.base import (
    Needs,
    Objective,
    ObjectiveInputs,
    _check_positive,
    _require,
    register_objective,
)


@dataclass(frozen=True)
class RmuConfig:
    # the steering layer; None lets the loop use the layer chosen by select-layers
    layer: int | None = None
    # norm of the target c * u. This and alpha are the RMU reference code's defaults, tuned
    # for 7B models: scale c with the chosen layer's typical activation norm.
    steering_coeff: float = 6.5
    alpha: float = 1200.0  # weight of the retain activation MSE
    seed: int = 0  # seeds the random direction u, so reruns steer toward the same target

    def __post_init__(self):
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0 or None, got {self.layer}")
        _check_positive("steering_coeff", self.steering_coeff)
        _check_positive("alpha", self.alpha, allow_zero=True)


@lru_cache(maxsize=8)
def _unit_vector(seed: int, d: int) -> Tensor:
    # uniform [0, 1) entries as in the RMU reference code: a fixed direction, not a balanced one
    u = torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).float()


@register_objective("rmu")
class Rmu(Objective):
    """RMU: scramble forget-token activations toward a fixed random vector, pin retain ones."""

    config_class = RmuConfig
    forget_unit = retain_unit = "activation"

    @property
    def needs(self) -> Needs:
        return Needs(activations=True, reference_activations=True)

    def target(self, d: int) -> Tensor:
        """The fixed forget target ``steering_coeff * u`` for width ``d``."""
        return self.config.steering_coeff * _unit_vector(self.config.seed, d)

    def forget_loss(self, inputs: ObjectiveInputs) -> Tensor:
        (acts,) = _require(self.name, inputs, "activations")
        target = self.target(acts.shape[-1]).to(acts.device)
        return F.mse_loss(acts.float(), target.expand_as(acts))

    def retain_term(self, inputs: ObjectiveInputs) -> Tensor:
        names = ("retain_activations", "ref_retain_activations")
        acts, ref = _require(self.name, inputs, *names)
        if acts.shape != ref.shape:
            raise ValueError(f"rmu: retain activations {tuple(acts.shape)} != {tuple(ref.shape)}")
        return self.config.alpha * F.mse_loss(acts.float(), ref.detach().float())
