"""SimNPO: reference-free, length-normalised NPO (Fan et al. 2024, arXiv:2410.07163)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mmie.unlearn.objectives.base import (
    Objective,
    ObjectiveInputs,
    _check_positive,
    register_objective,
)


@dataclass(frozen=True)
class SimNpoConfig:
    # larger than NPO's 0.1 because the length-normalised log-likelihood is a per-token value,
    # roughly |y| times smaller than NPO's sequence sums
    beta: float = 2.5
    gamma: float = 0.0  # reward margin subtracted inside the sigmoid (>= 0)
    retain_weight: float = 1.0  # weight of the retain loss (0: no retain term)

    def __post_init__(self):
        _check_positive("beta", self.beta)
        _check_positive("gamma", self.gamma, allow_zero=True)
        _check_positive("retain_weight", self.retain_weight, allow_zero=True)


@register_objective("simnpo")
class SimNpo(Objective):
    """SimNPO: NPO without a reference model, on length-normalised log-likelihoods."""

    config_class = SimNpoConfig
    forget_unit = "sequence"

    def forget_loss(self, inputs: ObjectiveInputs) -> Tensor:
        logp, n_tokens = self._forget_logprobs(inputs)
        beta, gamma = self.config.beta, self.config.gamma
        margin = -beta / n_tokens.to(logp.dtype) * logp - gamma
        return (-2.0 / beta * F.logsigmoid(margin)).mean()
