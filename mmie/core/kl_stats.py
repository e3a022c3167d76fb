"""The exact full-vocabulary KL to a frozen reference, the reference computed once.

:func:`mmie.core.losses.full_kl` needs the reference's final hidden states at every step: one
more forward pass of the decoder body and one more ``[tokens, d] x [d, vocabulary]`` product
per step. Through a linear head (no soft-cap), ``KL(ref || student)`` per token is

    (h_r - h_s) . m_r - lse_r + lse_s,        m_r = p_r @ W

(the bias cancels), so the reference enters only through ``m_r`` and one scalar per retain
token (:func:`mmie.core.kl_grad.reference_kl_stats`). :func:`ref_kl_stats` computes them once,
before training, as the top-k targets of :func:`mmie.core.losses.topk_kl` are, and
:func:`stats_kl` gives the KL and its gradient ``p_s @ W - m_r`` without the reference pass:
two head products per step instead of three, and no reference forward. A soft-capped head is
not linear in ``h``: those models keep ``full_kl``.

Precision. With an fp32 head the value and gradient equal ``full_kl``'s to float rounding
(Gemma 3, retain texts: about 1e-5 and 2e-6 apart). The value is a difference of terms near the
logits' scale, formed in fp64. Under ``head_precision("bf16")`` the gradient is as far from
the exact one as ``full_kl``'s (same bf16 rounding of the student's probabilities, and exactly
0 where the student's row equals the reference's), but the value is noisier: the student's
log-sum-exp carries the bf16 product's output rounding, which ``full_kl`` cancels against the
reference's rounded logits and the summary cannot (Gemma 3, hidden states 1% off the
reference: largest error 3e-3 against ``full_kl``'s 8e-4, at a mean KL of 6e-4). The value
is logged, never trained on; read it from an fp32 run where its digits matter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmie.core import losses
from mmie.core.head_precision import fast_weight, head_product
from mmie.core.kl_grad import cross_term, reference_kl_stats, stats_kl_and_grad
from mmie.core.losses import DEFAULT_CHUNK_SIZE, map_tokens
from mmie.core.models import unwrap


def applies(lm) -> bool:
    """Whether ``lm``'s head allows the summary: linear (no soft-cap) and frozen."""
    head = unwrap(lm.model).get_output_embeddings()
    bias = getattr(head, "bias", None)
    return losses.head_params(unwrap(lm.model))["softcap"] is None \
        and not head.weight.requires_grad and not (bias is not None and bias.requires_grad)


def _linear_only(softcap: float | None) -> None:
    if softcap is not None:
        raise ValueError("the KL summary needs a linear LM head; a soft-capped head "
                         "(final_logit_softcapping) needs losses.full_kl")


@torch.no_grad()
def ref_kl_stats(ref_hidden: Tensor, lm_head_weight: Tensor, mask: Tensor | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, *, softcap: float | None = None,
                 bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The reference's summary for :func:`stats_kl`: ``(m_r [B, T, d] fp32, m_fast [B, T, d]
    fp32, offset [B, T] fp64)``, zeros at masked positions; ``8 + 8 d`` bytes per token
    (5 KB for d = 640)."""
    _linear_only(softcap)
    fn = lambda h, w, b: reference_kl_stats(h, w, b)  # noqa: E731
    return map_tokens(fn, mask, (ref_hidden,), (lm_head_weight, bias), chunk_size,
                       single_output=False)


def _stats_kl_chunk(h, mean_row, m_fast, offset, weight, bias):
    lse = head_product(h, weight, bias, None).logsumexp(-1)
    cross = cross_term(h, mean_row, m_fast, fast_weight(weight))
    return ((offset - cross + lse.double()).to(lse.dtype),)


def stats_kl(student_hidden: Tensor, lm_head_weight: Tensor,
             summary: tuple[Tensor, Tensor, Tensor], mask: Tensor | None = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, *,
             softcap: float | None = None, bias: Tensor | None = None) -> Tensor:
    """Exact per-token ``KL(ref || student)`` over the full vocabulary, ``[B, T]``, the reference
    given by :func:`ref_kl_stats`. Gradients reach the hidden states only: the summary holds
    the reference's head, so a trainable head is refused."""
    _linear_only(softcap)
    if lm_head_weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("stats_kl holds the LM head fixed; a trainable head needs "
                         "losses.full_kl")
    per_token = (student_hidden, *summary)
    (out,) = map_tokens(_stats_kl_chunk, mask, per_token, (lm_head_weight, bias), chunk_size,
                         closed=stats_kl_and_grad)
    return out
