"""DPO with the alternative as the chosen and the forget continuation as the rejected answer.

Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), used for unlearning as
TOFU's IdkDPO (Maini et al. 2024, arXiv:2401.06121; "I don't know" as the chosen answer) and
AltPO (Mekala et al. 2024; an alternative answer as the chosen one). Per forget text ``x = (p, y)``
(prompt ``p``: the first half, :func:`mmie.core.data.split_prompt`; ``y`` the rest) and its
alternative ``a`` (``--alternative``):

    L = mean_x -log sigmoid(beta ((log pi(a|p) - log ref(a|p)) - (log pi(y|p) - log ref(y|p))))
        + retain_weight * L_retain

with summed log-likelihoods of the continuation tokens only (the prompt is never scored) and
``ref`` the frozen base model (precomputed once, as for NPO).

Known behaviour: the forget term lies in ``(0, log 2]`` at the start (0 margin gives ``log 2``)
and is bounded below by 0, so unlike gradient ascent it cannot run away: each pair's gradient
weight ``sigmoid(-beta * margin)`` fades once the pair is ranked right, the same saturation that
makes NPO stable (NPO is this loss without a chosen side, Zhang et al. 2024). The margin can also
grow by raising the alternative alone, so the forget text's likelihood may fall less than under
NPO; TOFU reports IdkDPO keeping more model utility and forgetting less than NPO.
"""

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
class DpoConfig:
    beta: float = 0.1  # inverse temperature on the log-ratio margin
    retain_weight: float = 1.0  # weight of the retain loss (0: no retain term)

    def __post_init__(self):
        _check_positive("beta", self.beta)
        _check_positive("retain_weight", self.retain_weight, allow_zero=True)


@register_objective("dpo")
class Dpo(Objective):
    """Prefer the alternative over the forget continuation, relative to the frozen model."""

    config_class = DpoConfig
    forget_unit = "sequence"

    @property
    def needs(self) -> Needs:
        return Needs(logprobs=True, reference_logprobs=True, alternative=True,
                     reference_alternative=True, continuation=True,
                     retain_loss=self._retain_weight() > 0)

    def margin(self, inputs: ObjectiveInputs) -> Tensor:
        """``(chosen log-ratio) - (rejected log-ratio)`` per pair."""
        rejected, _ = self._forget_logprobs(inputs)
        chosen, _ = self._alternative_logprobs(inputs)
        ref_rejected, ref_chosen = _require(self.name, inputs, "ref_logp", "ref_alt_logp")
        for name, ref in (("ref_logp", ref_rejected), ("ref_alt_logp", ref_chosen)):
            if ref.shape != rejected.shape or chosen.shape != rejected.shape:
                raise ValueError(f"dpo: {name}, logp and alt_logp must be the same [batch] shape")
        return (chosen - ref_chosen.detach()) - (rejected - ref_rejected.detach())

    def forget_loss(self, inputs: ObjectiveInputs) -> Tensor:
        return -F.logsigmoid(self.config.beta * self.margin(inputs)).mean()
