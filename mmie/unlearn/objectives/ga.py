"""Gradient ascent on the forget text (the simplest unlearning baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmie.unlearn.objectives.base import (
    Objective,
    ObjectiveInputs,
    register_objective,
)


@dataclass(frozen=True)
class GaConfig:
    """Gradient ascent has no options."""


@register_objective("ga")
class GradientAscent(Objective):
    """Minimise the token-mean log-likelihood of forget text, i.e. ascend its NLL."""

    config_class = GaConfig

    def forget_loss(self, inputs: ObjectiveInputs) -> Tensor:
        logp, n_tokens = self._forget_logprobs(inputs)
        # pooled over tokens (not a mean of per-sequence means): the usual causal-LM loss
        return logp.sum() / n_tokens.sum()
