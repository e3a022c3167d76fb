"""Retain losses, registered by name: keep the model's behaviour on text it must not forget.

``nll`` (token-mean NLL) and ``kl`` (token-mean KL to the frozen reference: the top-k
approximation of :func:`mmie.core.losses.topk_kl` by default, exact with ``exact=True``). Both start
from final hidden states and the LM-head weight (:mod:`mmie.core.losses`), never from logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from mmie.core import kl_stats, losses
from mmie.core.registry import Registry
from mmie.unlearn.objectives.base import _build, _check_positive, _require


@dataclass(frozen=True, eq=False)
class RetainInputs:
    """The updated model's retain batch, as final hidden states (see :mod:`mmie.core.losses`)."""

    hidden: Tensor  # [B, T, d] final hidden states (after the final norm)
    labels: Tensor  # [B, T] next-token ids aligned with hidden (losses.shift_labels)
    mask: Tensor  # [B, T] real positions
    lm_head_weight: Tensor  # [V, d]
    lm_head_bias: Tensor | None = None  # [V] for heads with a bias
    softcap: float | None = None  # final_logit_softcapping, if the model has one
    # (idx, logp, tail_logmass) from losses.ref_topk, computed once per retain example
    ref_targets: tuple[Tensor, Tensor, Tensor] | None = None
    ref_hidden: Tensor | None = None  # [B, T, d] reference final hidden states (exact KL)
    # (m_r, m_fast, offset) from kl_stats.ref_kl_stats, computed once per retain example:
    # the exact KL without ref_hidden (a head without soft-cap)
    ref_stats: tuple[Tensor, Tensor, Tensor] | None = None

    def head(self) -> dict:
        return {"bias": self.lm_head_bias, "softcap": self.softcap}


class RetainLoss:
    """Base class: a scalar loss that keeps the model's behaviour on retain text."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    needs_reference_targets: ClassVar[bool] = False  # inputs.ref_targets (losses.ref_topk)
    # inputs.ref_hidden every step, or inputs.ref_stats (computed once) through a linear head
    needs_reference_hidden: ClassVar[bool] = False

    def __init__(self, config: object | None = None):
        self.config = self.config_class() if config is None else config

    def __call__(self, inputs: RetainInputs) -> Tensor:
        raise NotImplementedError

    def scored(self, n_tokens: int) -> int:
        """How many of a batch's ``n_tokens`` predicted tokens the loss averages over."""
        return n_tokens


_RETAIN_LOSSES: Registry[type[RetainLoss]] = Registry("retain loss", tag="name")
register_retain_loss = _RETAIN_LOSSES.decorator


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


def _kept(n: int, frac: float) -> int:
    return max(1, round(frac * n))


def _subsample(mask: Tensor, frac: float) -> Tensor:
    """A uniform random ``frac`` of the True positions of ``mask`` (at least one)."""
    real = mask.nonzero()
    keep = _kept(len(real), frac)
    picked = real[torch.randperm(len(real), device=mask.device)[:keep]]
    out = torch.zeros_like(mask)
    out[tuple(picked.T)] = True
    return out


@dataclass(frozen=True)
class KlConfig:
    # True: exact full-vocabulary KL, from the reference's per-token summary (computed once;
    # kl_stats) or, under a soft-capped head, its hidden states every step
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

    def scored(self, n_tokens: int) -> int:
        frac = self.config.token_frac
        return n_tokens if frac >= 1.0 else _kept(n_tokens, frac)

    def __call__(self, inputs: RetainInputs) -> Tensor:
        if self.config.token_frac < 1.0:
            inputs = replace(inputs, mask=_subsample(inputs.mask, self.config.token_frac))
        return losses.masked_mean(self._per_token(inputs), inputs.mask)

    def _per_token(self, inputs: RetainInputs) -> Tensor:
        chunk = self.config.chunk_size
        if self.config.exact and inputs.ref_stats is not None:
            return kl_stats.stats_kl(inputs.hidden, inputs.lm_head_weight, inputs.ref_stats,
                                     inputs.mask, chunk, **inputs.head())
        if self.config.exact:
            (ref,) = _require("kl (exact)", inputs, "ref_hidden")
            return losses.full_kl(
                inputs.hidden, ref, inputs.lm_head_weight, inputs.mask, chunk, **inputs.head()
            )
        (targets,) = _require("kl", inputs, "ref_targets")
        return losses.topk_kl(
            inputs.hidden, inputs.lm_head_weight, *targets, inputs.mask, chunk, **inputs.head()
        )
