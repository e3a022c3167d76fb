"""Unlearning objectives, registered by name, computed from plain tensors.

An objective never runs a model. The training loop asks ``objective.needs`` what to compute
(sequence log-likelihoods, reference log-likelihoods, activations, a retain loss), fills an
:class:`ObjectiveInputs`, and calls ``objective.loss(inputs)``. That keeps every formula
testable with hand-made numbers. The interface and registries are in
:mod:`mmie.unlearn.objectives.base`, the retain losses in :mod:`mmie.unlearn.objectives.retain`;
this module re-exports both, so importing it registers everything.

Objectives (``objective_names()``):

- ``ga``: gradient ascent, minimise the mean per-token log-likelihood of forget text (-NLL).
- ``graddiff``: ``ga`` plus ``retain_weight`` x retain loss.
- ``npo``: Negative Preference Optimization (Zhang et al. 2024),
  ``-(2/beta) logsigmoid(-beta (logp - ref_logp))`` per sequence, where ``logp`` is the summed
  log-likelihood of the whole forget continuation; plus ``retain_weight`` x retain loss.
- ``simnpo``: reference-free, length-normalised NPO (Fan et al. 2024),
  ``-(2/beta) logsigmoid(-(beta/|y|) logp - gamma)``; plus ``retain_weight`` x retain loss.
- ``rmu``: Representation Misdirection (Li et al. 2024): MSE between layer-L activations on
  forget tokens and ``steering_coeff * u`` for a fixed seeded random unit vector u, plus
  ``alpha`` x MSE between the updated and frozen model's activations on retain tokens.

Retain losses (``retain_loss_names()``): ``nll`` and ``kl`` (:mod:`mmie.unlearn.objectives.retain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from mmie.unlearn.objectives.base import (
    UNITS,
    Needs,
    Objective,
    ObjectiveInputs,
    _check_positive,
    _require,
    get_objective,
    objective_names,
    register_objective,
)
from mmie.unlearn.objectives.retain import (
    KlRetain,
    NllRetain,
    RetainInputs,
    RetainLoss,
    _subsample,
    get_retain_loss,
    register_retain_loss,
    retain_loss_names,
)

__all__ = ["UNITS", "GradDiff", "GradientAscent", "KlRetain", "Needs", "NllRetain", "Npo",
           "Objective", "ObjectiveInputs", "RetainInputs", "RetainLoss", "Rmu", "SimNpo",
           "_subsample", "get_objective", "get_retain_loss", "objective_names",
           "register_objective", "register_retain_loss", "retain_loss_names"]


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


@dataclass(frozen=True)
class GradDiffConfig:
    retain_weight: float = 1.0  # weight of the retain loss next to the GA term (> 0)

    def __post_init__(self):
        _check_positive("retain_weight", self.retain_weight)


@register_objective("graddiff")
class GradDiff(GradientAscent):
    """Gradient difference: ascend on forget, descend on retain."""

    config_class = GradDiffConfig


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
