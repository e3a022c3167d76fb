"""Unlearning objectives and retain losses, registered by name, computed from plain tensors.

An objective never runs a model. The training loop asks ``objective.needs`` what to compute
(sequence log-likelihoods, reference log-likelihoods, activations, a retain loss), fills an
:class:`ObjectiveInputs`, and calls ``objective.loss(inputs)``. That keeps every formula
testable with hand-made numbers.

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

Retain losses (``retain_loss_names()``): ``nll`` and ``kl`` (to the frozen reference, top-k
approximation from :func:`mmie.losses.topk_kl` by default, exact with ``exact=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mmie import losses


@dataclass(frozen=True)
class Needs:
    """What the training loop must put into :class:`ObjectiveInputs` for one step."""

    logprobs: bool = False  # logp and n_tokens of the updated model on forget text
    reference_logprobs: bool = False  # ref_logp: the frozen reference model on forget text
    activations: bool = False  # activations (forget) and retain_activations at config.layer
    reference_activations: bool = False  # ref_retain_activations: frozen model, retain text
    retain_loss: bool = False  # retain_loss: a scalar from the retain-loss registry


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


def _registrar(registry: dict[str, type], kind: str) -> Callable[[str], Callable[[type], type]]:
    """A ``register_<kind>(name)`` class decorator that fills ``registry``."""

    def register(name: str) -> Callable[[type], type]:
        """Class decorator: make the class available under ``name``."""

        def add(cls: type) -> type:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is already registered")
            cls.name = name
            registry[name] = cls
            return cls

        return add

    return register


def _build(registry: dict[str, type], kind: str, name: str, options: dict):
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
        logp, n_tokens = _require(self.name, inputs, "logp", "n_tokens")
        if logp.shape != n_tokens.shape or logp.dim() != 1:
            raise ValueError(f"{self.name}: logp and n_tokens must both be [batch] tensors")
        if (n_tokens <= 0).any():
            raise ValueError(f"{self.name}: every forget sequence needs at least one token")
        return logp, n_tokens


_OBJECTIVES: dict[str, type[Objective]] = {}


register_objective = _registrar(_OBJECTIVES, "objective")


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


def get_objective(name: str, **options: object) -> Objective:
    """Build objective ``name`` with its config fields set from ``options``."""
    return _build(_OBJECTIVES, "objective", name, options)


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


@dataclass(frozen=True, eq=False)
class RetainInputs:
    """The updated model's retain batch, as final hidden states (see :mod:`mmie.losses`)."""

    hidden: Tensor  # [B, T, d] final hidden states (after the final norm)
    labels: Tensor  # [B, T] next-token ids aligned with hidden (losses.shift_labels)
    mask: Tensor  # [B, T] real positions
    lm_head_weight: Tensor  # [V, d]
    lm_head_bias: Tensor | None = None  # [V] for heads with a bias
    softcap: float | None = None  # final_logit_softcapping, if the model has one
    # (idx, logp, tail_logmass) from losses.ref_topk, computed once per retain example
    ref_targets: tuple[Tensor, Tensor, Tensor] | None = None
    ref_hidden: Tensor | None = None  # [B, T, d] reference final hidden states (exact KL)

    def head(self) -> dict:
        return {"bias": self.lm_head_bias, "softcap": self.softcap}


class RetainLoss:
    """Base class: a scalar loss that keeps the model's behaviour on retain text."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    needs_reference_targets: ClassVar[bool] = False  # inputs.ref_targets (losses.ref_topk)
    needs_reference_hidden: ClassVar[bool] = False  # inputs.ref_hidden, every step

    def __init__(self, config: object | None = None):
        self.config = self.config_class() if config is None else config

    def __call__(self, inputs: RetainInputs) -> Tensor:
        raise NotImplementedError


_RETAIN_LOSSES: dict[str, type[RetainLoss]] = {}


register_retain_loss = _registrar(_RETAIN_LOSSES, "retain loss")


def retain_loss_names() -> list[str]:
    return sorted(_RETAIN_LOSSES)


def get_retain_loss(name: str, **options: object) -> RetainLoss:
    """Build retain loss ``name`` with its config fields set from ``options``."""
    return _build(_RETAIN_LOSSES, "retain loss", name, options)


@dataclass(frozen=True)
class NllConfig:
    chunk_size: int = losses.DEFAULT_CHUNK_SIZE  # tokens per vocabulary chunk

    def __post_init__(self):
        _check_positive("chunk_size", self.chunk_size)


@register_retain_loss("nll")
class NllRetain(RetainLoss):
    """Token-mean NLL of retain text: keeps it likely, ignores how the rest of the
    distribution moves."""

    config_class = NllConfig

    def __call__(self, inputs: RetainInputs) -> Tensor:
        head = inputs.head()
        chunk = self.config.chunk_size
        logp = losses.token_logprobs(
            inputs.hidden, inputs.lm_head_weight, inputs.labels, inputs.mask, chunk, **head
        )
        return -losses.masked_mean(logp, inputs.mask)


def _subsample(mask: Tensor, frac: float) -> Tensor:
    """A uniform random ``frac`` of the True positions of ``mask`` (at least one)."""
    real = mask.nonzero()
    keep = max(1, round(frac * len(real)))
    picked = real[torch.randperm(len(real), device=mask.device)[:keep]]
    out = torch.zeros_like(mask)
    out[tuple(picked.T)] = True
    return out


@dataclass(frozen=True)
class KlConfig:
    # True: exact full-vocabulary KL, needs the reference's hidden states every step
    exact: bool = False
    top_k: int = 64  # reference ids kept per token by losses.ref_topk (when exact is False)
    chunk_size: int = losses.DEFAULT_CHUNK_SIZE  # tokens per vocabulary chunk
    # Share of retain positions scored each step, drawn at random (torch RNG, so seeded). The
    # mean over a uniform subset is an unbiased estimate of the token-mean KL; the head's
    # full-vocabulary matmul, the dominant CPU cost, shrinks in proportion. 1.0 scores all.
    token_frac: float = 1.0

    def __post_init__(self):
        _check_positive("top_k", self.top_k)
        _check_positive("chunk_size", self.chunk_size)
        if not 0.0 < self.token_frac <= 1.0:
            raise ValueError(f"token_frac must be in (0, 1], got {self.token_frac}")


@register_retain_loss("kl")
class KlRetain(RetainLoss):
    """Token-mean KL(reference || model) on retain text: keeps the whole distribution."""

    config_class = KlConfig

    @property
    def needs_reference_targets(self) -> bool:
        return not self.config.exact

    @property
    def needs_reference_hidden(self) -> bool:
        return self.config.exact

    def __call__(self, inputs: RetainInputs) -> Tensor:
        if self.config.token_frac < 1.0:
            inputs = replace(inputs, mask=_subsample(inputs.mask, self.config.token_frac))
        return losses.masked_mean(self._per_token(inputs), inputs.mask)

    def _per_token(self, inputs: RetainInputs) -> Tensor:
        chunk = self.config.chunk_size
        if self.config.exact:
            (ref,) = _require("kl (exact)", inputs, "ref_hidden")
            return losses.full_kl(
                inputs.hidden, ref, inputs.lm_head_weight, inputs.mask, chunk, **inputs.head()
            )
        (targets,) = _require("kl", inputs, "ref_targets")
        return losses.topk_kl(
            inputs.hidden, inputs.lm_head_weight, *targets, inputs.mask, chunk, **inputs.head()
        )
