"""Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868)."""

from __future__ import annotations

from dataclasses import dataclass

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
class NpoConfig:
    beta: float = 0.1  # inverse temperature; as beta -> 0 the gradient becomes GA's
    retain_weight: float = 1.0  # weight of the retain loss (0: plain NPO, no retain term)

    def __post_init__(self):
        _check_positive("beta", self.beta)
        _check_positive("retain_weight", self.retain_weight, allow_zero=True)


@register_objective("npo")
class Npo(Objective):
    """NPO: GA with a per-sequence weight ``2 sigmoid(beta (logp - ref_logp))`` that fades as
    the likelihood drops below the reference's, which stops the runaway collapse of GA."""

    config_class = NpoConfig
    forget_unit = "sequence"

    @property
    def needs(self) -> Needs:
        return Needs(logprobs=True, reference_logprobs=True, retain_loss=self._retain_weight() > 0)

    def forget_loss(self, inputs: ObjectiveInputs) -> Tensor:
        logp, _ = self._forget_logprobs(inputs)
        (ref_logp,) = _require(self.name, inputs, "ref_logp")
        if ref_logp.shape != logp.shape:
            raise ValueError(f"npo: ref_logp {tuple(ref_logp.shape)} != logp {tuple(logp.shape)}")
        beta = self.config.beta
        log_ratio = logp - ref_logp.detach()
        return (-2.0 / beta * F.logsigmoid(-beta * log_ratio)).mean()
