"""The objective interface: what an objective needs, its inputs, and the name registries.

The concrete objectives live in :mod:`mmie.unlearn.objectives`, the retain losses in
:mod:`mmie.unlearn.objectives.retain`; import names from :mod:`mmie.unlearn.objectives`, which
registers them all.

Every loss term here is a *mean* over some unit: sequences, predicted tokens, or the real tokens
whose activations an objective reads. Each objective names the unit of its forget and its retain
term (``forget_unit``, ``retain_unit``), so data-parallel training can weight each process's
share by its count of that unit and recover the mean over the whole global batch exactly
(:mod:`mmie.unlearn.train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from torch import Tensor

from mmie.core.registry import Registry

# What a mean runs over: whole sequences, predicted tokens (positions with a next token), or the
# real tokens other than BOS whose block activations an objective reads, or the alternative
# continuation's predicted tokens (redirect).
UNITS = ("sequence", "token", "activation", "alternative")


@dataclass(frozen=True)
class Needs:
    """What the training loop must put into :class:`ObjectiveInputs` for one step."""

    logprobs: bool = False  # logp and n_tokens of the updated model on forget text
    reference_logprobs: bool = False  # ref_logp: the frozen reference model on forget text
    activations: bool = False  # activations (forget) and retain_activations at config.layer
    reference_activations: bool = False  # ref_retain_activations: frozen model, retain text
    retain_loss: bool = False  # retain_loss: a scalar from the retain-loss registry
    # alt_logp / alt_n_tokens: the updated model on the alternative text after the forget prompt
    alternative: bool = False
    reference_alternative: bool = False  # ref_alt_logp: the frozen model on the same tokens
    # logp / ref_logp score only the forget text's continuation after its prompt (the first
    # half, mmie.core.data.split_prompt), not the whole text: the rejected side of a preference
    continuation: bool = False


@dataclass(frozen=True, eq=False)
class ObjectiveInputs:
    """Plain tensors for one step; fields an objective does not need may stay ``None``."""

    logp: Tensor | None = None  # [B] summed log p(continuation) under the updated model
    n_tokens: Tensor | None = None  # [B] real continuation tokens per sequence (> 0)
    ref_logp: Tensor | None = None  # [B] same sums under the frozen reference model
    activations: Tensor | None = None  # [N, d] updated model, layer L, real forget tokens
    retain_activations: Tensor | None = None  # [M, d] updated model, layer L, retain tokens
    ref_retain_activations: Tensor | None = None  # [M, d] frozen model, same retain tokens
    retain_loss: Tensor | None = None  # scalar from a RetainLoss, already reduced
    alt_logp: Tensor | None = None  # [B] summed log p(alternative | forget prompt), updated model
    alt_n_tokens: Tensor | None = None  # [B] alternative tokens per sequence (> 0)
    ref_alt_logp: Tensor | None = None  # [B] same sums under the frozen reference model


def _require(owner: str, inputs: object, *names: str) -> list[Tensor]:
    """The named fields of ``inputs``; a missing one is a loop bug worth a clear message."""
    values = [getattr(inputs, n) for n in names]
    missing = [n for n, v in zip(names, values, strict=True) if v is None]
    if missing:
        raise ValueError(f"{owner} needs inputs.{', inputs.'.join(missing)}, got None")
    return values


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")


def _build(registry: Registry, kind: str, name: str, options: dict):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    cls = registry[name]
    valid = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"{kind} {name!r} has no option {', '.join(unknown)}; options: "
            f"{', '.join(sorted(valid)) or '(none)'}"
        )
    return cls(cls.config_class(**options))


class Objective:
    """Base class: subclasses set ``config_class`` and implement :meth:`forget_loss`."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    forget_unit: ClassVar[str] = "token"  # what forget_loss averages over (UNITS)
    # what retain_term averages over: "token" means the retain loss's scored tokens
    retain_unit: ClassVar[str] = "token"

    def __init__(self, config: object | None = None):
        self.config = self.config_class() if config is None else config
        if not isinstance(self.config, self.config_class):
            raise ValueError(f"{self.name} takes a {self.config_class.__name__}")

    @property
    def needs(self) -> Needs:
        return Needs(logprobs=True, retain_loss=self._retain_weight() > 0)

    def _retain_weight(self) -> float:
        return getattr(self.config, "retain_weight", 0.0)

    def forget_loss(self, inputs: ObjectiveInputs) -> Tensor:
        raise NotImplementedError

    def forget_terms(self, inputs: ObjectiveInputs) -> dict[str, Tensor]:
        """The forget loss split by the unit each part averages over (they sum to
        :meth:`forget_loss`); the training loop weights each part by its own unit's share."""
        return {self.forget_unit: self.forget_loss(inputs)}

    def retain_term(self, inputs: ObjectiveInputs) -> Tensor | None:
        """The weighted retain part of :meth:`loss`, or ``None`` when the objective has none."""
        if not self.needs.retain_loss:
            return None
        (retain,) = _require(self.name, inputs, "retain_loss")
        return self._retain_weight() * retain

    def loss(self, inputs: ObjectiveInputs) -> Tensor:
        """Scalar to minimise: forget term plus the retain term, if any."""
        forget = self.forget_loss(inputs)
        retain = self.retain_term(inputs)
        return forget if retain is None else forget + retain

    def _forget_logprobs(self, inputs: ObjectiveInputs) -> tuple[Tensor, Tensor]:
        return self._sums(inputs, "logp", "n_tokens", "forget")

    def _alternative_logprobs(self, inputs: ObjectiveInputs) -> tuple[Tensor, Tensor]:
        return self._sums(inputs, "alt_logp", "alt_n_tokens", "alternative")

    def _sums(self, inputs: ObjectiveInputs, logp_name: str, count_name: str,
              what: str) -> tuple[Tensor, Tensor]:
        logp, n_tokens = _require(self.name, inputs, logp_name, count_name)
        if logp.shape != n_tokens.shape or logp.dim() != 1:
            raise ValueError(f"{self.name}: {logp_name} and {count_name} must both be [batch] "
                             "tensors")
        if (n_tokens <= 0).any():
            raise ValueError(f"{self.name}: every {what} sequence needs at least one token")
        return logp, n_tokens


_OBJECTIVES: Registry[type[Objective]] = Registry("objective", tag="name")
register_objective = _OBJECTIVES.decorator


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


def get_objective(name: str, **options: object) -> Objective:
    """Build objective ``name`` with its config fields set from ``options``."""
    return _build(_OBJECTIVES, "objective", name, options)
