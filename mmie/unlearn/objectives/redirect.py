"""Redirect: train a positive target after the forget prompt, alone or on top of NPO / SimNPO.

Formula, per step over the batch's forget texts ``x = (p, y)`` (prompt ``p``: the first half of
the text, :func:`mmie.core.data.split_prompt`) and their alternatives ``a`` (``--alternative``,
line-aligned with ``--forget``; e.g. the aligned English sentence of each Hindi one):

    L = redirect_weight * NLL(a | p) + L_base(x) + retain_weight * L_retain

where ``NLL(a | p) = -sum_i log p(a_i | p, a_<i) / sum |a|`` is pooled over every alternative
token of the batch (only the alternative's tokens are scored, never the prompt's), and
``L_base`` is the NPO or SimNPO forget term (``base=npo|simnpo``; ``base=none`` drops it).

Why: gradient-ascent style objectives only push the forget language down; what rises in its place
is left to chance (a related language, another script, junk). A positive target says what should
come instead, as the alternative answers of AltPO (Mekala et al. 2024, "Alternate Preference
Optimization for Unlearning Factual Knowledge in Large Language Models") and the "I don't know"
targets of TOFU's IdK variants (Maini et al. 2024, arXiv:2401.06121) do for facts.

What it is known to do (issue #20, measured outside this project on the default model: LoRA r=8
on every projection, 40 steps at lr 3e-4, NTREX, KL retain on en+ur+pa+bn): with NPO, Hindi rate
0.00 and Hindi prompts answered in on-topic English 76% of the time (Bengali 14%, junk 10%), but
Bengali kept only 58% of its base rate and English perplexity rose 6.7%; redirect alone: Hindi
0.00, English answers 96%, Urdu kept 96% of its base rate, Punjabi 83%, Bengali 82%, English
perplexity +6.0%. Not yet reproduced with `mmie unlearn`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmie.unlearn.objectives.base import (
    Needs,
    Objective,
    ObjectiveInputs,
    _check_positive,
    register_objective,
)
from mmie.unlearn.objectives.npo import Npo, NpoConfig
from mmie.unlearn.objectives.simnpo import SimNpo, SimNpoConfig

BASES = ("none", "npo", "simnpo")


@dataclass(frozen=True)
class RedirectConfig:
    base: str = "none"  # forget term added to the redirect NLL: none, npo or simnpo
    redirect_weight: float = 1.0  # weight of the alternative's NLL
    beta: float | None = None  # the base's beta (None: its own default, NPO 0.1, SimNPO 2.5)
    gamma: float = 0.0  # SimNPO's reward margin (base=simnpo only)
    retain_weight: float = 1.0  # weight of the retain loss (0: no retain term)

    def __post_init__(self):
        if self.base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}, got {self.base!r}")
        _check_positive("redirect_weight", self.redirect_weight)
        _check_positive("retain_weight", self.retain_weight, allow_zero=True)
        _check_positive("gamma", self.gamma, allow_zero=True)
        if self.beta is not None:
            _check_positive("beta", self.beta)
        if self.base == "none" and self.beta is not None:
            raise ValueError("beta sets the base objective's beta; base=none has none")
        if self.gamma and self.base != "simnpo":
            raise ValueError("gamma is SimNPO's margin: it needs base=simnpo")


def _base_objective(c: RedirectConfig) -> Objective | None:
    """The base forget term, without a retain term of its own (redirect adds that once)."""
    beta = {} if c.beta is None else {"beta": c.beta}
    if c.base == "npo":
        return Npo(NpoConfig(retain_weight=0.0, **beta))
    if c.base == "simnpo":
        return SimNpo(SimNpoConfig(gamma=c.gamma, retain_weight=0.0, **beta))
    return None


@register_objective("redirect")
class Redirect(Objective):
    """NLL of the alternative text after the forget prompt, plus an optional NPO/SimNPO term."""

    config_class = RedirectConfig
    forget_unit = "alternative"

    def __init__(self, config: RedirectConfig | None = None):
        super().__init__(config)
        self.base = _base_objective(self.config)

    @property
    def needs(self) -> Needs:
        npo = self.config.base == "npo"
        return Needs(logprobs=self.base is not None, reference_logprobs=npo, alternative=True,
                     retain_loss=self._retain_weight() > 0)

    def redirect_nll(self, inputs: ObjectiveInputs) -> Tensor:
        """Token-pooled NLL of the alternative continuations (the usual causal-LM loss)."""
        alt_logp, alt_n = self._alternative_logprobs(inputs)
        return -alt_logp.sum() / alt_n.sum()

    def forget_terms(self, inputs: ObjectiveInputs) -> dict[str, Tensor]:
        terms = {"alternative": self.config.redirect_weight * self.redirect_nll(inputs)}
        if self.base is not None:
            terms[self.base.forget_unit] = self.base.forget_loss(inputs)
        return terms

    def forget_loss(self, inputs: ObjectiveInputs) -> Tensor:
        return sum(self.forget_terms(inputs).values())
