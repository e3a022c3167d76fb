"""Unlearning objectives, registered by name, computed from plain tensors.

An objective never runs a model. The training loop asks ``objective.needs`` what to compute
(sequence log-likelihoods, reference log-likelihoods, activations, a retain loss), fills an
:class:`ObjectiveInputs`, and calls ``objective.loss(inputs)``. That keeps every formula
testable with hand-made numbers. Each objective is one file here (``npo.py``...),
registered by name with ``@register_objective``; adding one is adding a file and importing it
below. The interface and registries are in
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
- ``redirect``: NLL of an alternative text after the forget prompt (``--alternative``), alone or
  plus NPO / SimNPO (``base``, ``redirect_weight``); plus ``retain_weight`` x retain loss.
- ``dpo``: DPO (Rafailov et al. 2023) with the alternative as chosen and the forget text's
  continuation as rejected, ``-logsigmoid(beta (chosen log-ratio - rejected log-ratio))``.
- ``rmu``: Representation Misdirection (Li et al. 2024): MSE between layer-L activations on
  forget tokens and ``steering_coeff * u`` for a fixed seeded random unit vector u, plus
  ``alpha`` x MSE between the updated and frozen model's activations on retain tokens.

Retain losses (``retain_loss_names()``): ``nll`` and ``kl`` (:mod:`mmie.unlearn.objectives.retain`).
"""

from __future__ import annotations

from mmie.unlearn.objectives.base import (
    UNITS,
    Needs,
    Objective,
    ObjectiveInputs,
    get_objective,
    objective_names,
    register_objective,
)
from mmie.unlearn.objectives.dpo import Dpo
from mmie.unlearn.objectives.ga import GradientAscent
from mmie.unlearn.objectives.graddiff import GradDiff
from mmie.unlearn.objectives.npo import Npo
from mmie.unlearn.objectives.redirect import Redirect
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
from mmie.unlearn.objectives.rmu import Rmu
from mmie.unlearn.objectives.simnpo import SimNpo

__all__ = ["UNITS", "Dpo", "GradDiff", "GradientAscent", "KlRetain", "Needs", "NllRetain", "Npo",
           "Objective", "ObjectiveInputs", "Redirect", "RetainInputs", "RetainLoss", "Rmu",
           "SimNpo", "_subsample", "get_objective", "get_retain_loss", "objective_names",
           "register_objective", "register_retain_loss", "retain_loss_names"]
