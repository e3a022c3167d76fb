"""Per-token losses through the LM head with their gradients in closed form: the exact
full-vocabulary KL and the label log-probability.

``KL(ref || student)`` per token, with ``p_s = softmax(z_s)`` and ``p_r = softmax(z_r)`` over the
whole vocabulary, has the gradient ``p_s - p_r`` with respect to the student's logits (times
``1 - (z_s / c)^2`` under a soft-cap ``c``), and then ``(p_s - p_r) @ W`` with respect to the
student's hidden row. Autograd reaches the same numbers through the log-softmax and the KL's
elementwise graph, about a dozen ``[chunk, vocabulary]`` tensors per chunk; for Gemma 3's
262,144 ids those passes over memory cost more than the head's matmuls. This module computes
the value and the gradient in a handful of passes; :func:`mmie.core.losses.full_kl` uses it
when only the hidden states are trained (LoRA, ReFT: the head is frozen), and autograd
otherwise. The label's log-probability ``z_y - logsumexp(z)`` likewise has the gradient
``onehot(y) - p_s`` (:func:`label_logprob_and_grad`, for :func:`mmie.core.losses.token_logprobs`:
every forget, alternative and retain log-likelihood an objective reads).

Under ``head_precision("bf16")`` the logits are :func:`mmie.core.head_precision.fast_logits`'
(bf16 product, each row's largest logits exact in fp32) and the gradient follows the same split,
as autograd through that function would: the exact ids through the fp32 weight rows, the rest
through the bf16 copy. Every reduction stays in fp32. Without a soft-cap the bf16 block is
read once into ``exp(z - max z)`` (:func:`_student_exp`): no separate fp32 copy of it, no
``logsumexp`` temporary; the exponentials go through the head unnormalised and the ``[chunk,
d]`` result is divided by their sum. So the tail's probabilities are rounded to bf16 at
another scale than autograd rounds them: the gradient is as far from the exact one as
autograd's, not bit-equal to it.

:func:`reference_kl_stats` and :func:`stats_kl_and_grad` compute the exact KL from a summary of
the reference made once (:mod:`mmie.core.kl_stats`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmie.core.head_precision import (
    EXACT_TOP,
    exact_at,
    exact_logits,
    fast_weight,
    head_product,
)


def _student_logits(h: Tensor, weight: Tensor, bias: Tensor | None, fast: Tensor | None,
                    also: Tensor | None = None) -> tuple[Tensor, tuple | None]:
    """fp32 logits before any soft-cap, as :func:`mmie.core.head_precision.fast_logits` makes
    them (each row's top ids exact, then the ids in ``also``), and how the gradient splits:
    None (all through one product) or ``(ids computed exactly, 0/1 weight per id)``; an id both
    among the top and in ``also`` took its value from ``also``'s recomputation only."""
    if fast is None:
        logits = (h.to(weight.dtype) @ weight.T).to(torch.promote_types(weight.dtype,
                                                                         torch.float32))
        split = None
    else:
        logits = (h.to(fast.dtype) @ fast.T).float()
        top = logits.topk(min(EXACT_TOP, logits.shape[-1]), dim=-1).indices
        exact_at(logits, h, weight, top)
        if also is not None:
            exact_at(logits, h, weight, also)
        split = _split(top, also)
    return (logits if bias is None else logits + bias), split


def _split(top: Tensor, also: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(ids computed exactly, 0/1 weight per id)``: each row's top ids, then ``also``'s; an
    id in both counts once, as ``also``'s (its value came from that recomputation)."""
    once = torch.ones_like(top, dtype=torch.float32)
    if also is None:
        return top, once
    once = torch.cat([once.masked_fill((top[:, :, None] == also[:, None]).any(-1), 0),
                      torch.ones_like(also, dtype=torch.float32)], -1)
    return torch.cat([top, also], -1), once


def _student_exp(h: Tensor, weight: Tensor, bias: Tensor | None, fast: Tensor | None,
                 also: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, tuple | None, Tensor]:
    """The logits of :func:`_student_logits` (no soft-cap) as :func:`_shifted_exp` returns them,
    with the split and the logits at ``also``. Under a bf16 product the ``[chunk, vocabulary]``
    block is never copied to fp32 on its own: the shift by the largest exact logit reads the
    bf16 block once and writes the fp32 one (a bias, rare, takes :func:`_student_logits`)."""
    if fast is None or bias is not None:
        logits, split = _student_logits(h, weight, bias, fast, also)
        picked = None if also is None else logits.gather(-1, also)
        return (*_shifted_exp(logits), split, picked)
    low = h.to(fast.dtype) @ fast.T
    ids, once = _split(low.topk(min(EXACT_TOP, low.shape[-1]), dim=-1).indices, also)
    exact = exact_logits(h, weight, ids)
    top = exact.amax(-1, keepdim=True)  # the bf16 ones differ by rounding: a safe shift
    shifted = torch.sub(low, top).exp_().scatter_(-1, ids, (exact - top).exp_())
    total = shifted.sum(-1)
    picked = None if also is None else exact[:, -also.shape[-1]:]
    return shifted, total, top[:, 0] + total.log(), (ids, once), picked


def _through_head(grad_logits: Tensor, weight: Tensor, fast: Tensor | None,
                  split: tuple | None) -> Tensor:
    """``d loss / d h`` from ``d loss / d logits`` (``grad_logits`` is consumed)."""
    through_fast, through_exact = _through_head_parts(grad_logits, weight, fast, split)
    return through_fast if through_exact is None else through_fast + through_exact


def _through_head_parts(grad_logits: Tensor, weight: Tensor, fast: Tensor | None,
                        split: tuple | None) -> tuple[Tensor, Tensor | None]:
    """:func:`_through_head` in two parts: through the bf16 product (all of it without a
    split) and through the ids computed exactly (None without a split)."""
    if split is None:
        return grad_logits.to(weight.dtype) @ weight, None
    idx, once = split
    exact = grad_logits.gather(-1, idx) * once
    grad_logits.scatter_(-1, idx, 0.0)  # those ids' logits did not come from the bf16 product
    return (grad_logits.to(fast.dtype) @ fast).float(), \
        torch.einsum("nk,nkd->nd", exact, weight[idx].float())


@torch.no_grad()
def full_kl_and_grad(h: Tensor, ref_h: Tensor, weight: Tensor, bias: Tensor | None,
                     softcap: float | None) -> tuple[Tensor, Tensor]:
    """Per-token ``KL(ref || student)`` (``[chunk]``) and its gradient with respect to ``h``
    (``[chunk, d]``, in ``h``'s dtype), the head ``weight`` (and ``bias``) held fixed."""
    fast = fast_weight(weight)
    logits, split = _student_logits(h, weight, bias, fast)
    if softcap is not None:
        logits = softcap * torch.tanh(logits.div_(softcap))
    student = logits.log_softmax(-1)
    ref = head_product(ref_h, weight, bias, softcap).log_softmax(-1)
    p_ref = ref.exp()
    value = torch.linalg.vecdot(p_ref, ref.sub_(student))
    del ref
    grad = student.exp_().sub_(p_ref)  # p_s - p_r
    if softcap is not None:
        grad.mul_(1 - (logits / softcap).square_())
    return value, _through_head(grad, weight, fast, split).to(h.dtype)


@torch.no_grad()
def label_logprob_and_grad(h: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None,
                           softcap: float | None) -> tuple[Tensor, Tensor]:
    """Per-token ``log p(label)`` (``[chunk]``) and its gradient with respect to ``h``, the
    head held fixed: the values :func:`mmie.core.losses.token_logprobs` computes."""
    fast, rows = fast_weight(weight), labels[:, None]
    squash = None
    if softcap is None:
        grad, total, lse, split, picked = _student_exp(h, weight, bias, fast, rows)
    else:
        logits, split = _student_logits(h, weight, bias, fast, rows)
        logits = softcap * torch.tanh(logits.div_(softcap))
        squash = 1 - (logits / softcap).square_()
        picked = logits.gather(-1, rows)
        grad, total, lse = _shifted_exp(logits)
    grad.neg_().scatter_add_(-1, rows, total[:, None])  # (onehot(y) - p_s) * total
    if squash is not None:
        grad.mul_(squash)
    through = _through_head(grad, weight, fast, split) / total[:, None]
    return picked[:, 0] - lse, through.to(h.dtype)


def _shifted_exp(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``exp(z - max z)`` written over ``logits``, its row sums and the rows' logsumexp: the
    passes ``torch.logsumexp`` makes, without its ``[chunk, vocabulary]`` temporary, and the
    exponentials kept. Callers push them through the head unnormalised and divide the
    ``[chunk, d]`` result by the sums (the product is linear) rather than the logits."""
    top = logits.amax(-1, keepdim=True)
    shifted = logits.sub_(top).exp_()
    total = shifted.sum(-1)
    return shifted, total, top[:, 0] + total.log()


# --- KL(ref || student) from a per-token summary of the reference -----------------------------
# Through a linear head (no soft-cap), z = W h + b and
#   KL = sum_v p_r(v) (z_r(v) - z_s(v)) - lse_r + lse_s = (h_r - h_s) . m_r - lse_r + lse_s
# with m_r = p_r @ W (the bias cancels): the reference enters only through m_r ([d]) and the
# scalar h_r . m_r - lse_r, computed once per retain token instead of a reference forward pass
# and head product every step. The gradient is p_s @ W - m_r.

@torch.no_grad()
def reference_kl_stats(ref_h: Tensor, weight: Tensor,
                       bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(m_r [chunk, d], m_fast [chunk, d], offset [chunk] fp64)`` of the reference rows
    ``ref_h``. ``m_r = p_r @ W`` through the product split a student row takes (so the gradient
    is exactly 0 where the student's row equals the reference's); ``m_fast`` is its part
    through the bf16 product (0 without one), which the value pairs with ``h`` rounded as that
    product rounds it; ``offset = h_r . m_r - lse_r`` formed the same way."""
    fast = fast_weight(weight)
    shifted, total, lse, split, _ = _student_exp(ref_h, weight, bias, fast)
    m_fast, m_exact = _through_head_parts(shifted, weight, fast, split)
    m_fast = m_fast.to(torch.promote_types(m_fast.dtype, torch.float32))
    if m_exact is None:  # the same operations as the student's gradient, so 0 at h = h_r
        mean_row, m_fast = m_fast / total[:, None], torch.zeros_like(m_fast)
    else:
        mean_row, m_fast = (m_fast + m_exact) / total[:, None], m_fast / total[:, None]
    return mean_row, m_fast, cross_term(ref_h, mean_row, m_fast, fast) - lse.double()


def dot64(h: Tensor, mean_row: Tensor) -> Tensor:
    """Row-wise ``h . mean_row`` in fp64: the KL (~1e-3) is a difference of such terms, which
    are near the logits' scale (tens)."""
    return torch.linalg.vecdot(h.double(), mean_row.double())


def cross_term(h: Tensor, mean_row: Tensor, m_fast: Tensor, fast: Tensor | None) -> Tensor:
    """``sum_v p_r(v) z(v)`` for the logits ``z`` of ``h``: the exact ids' part with ``h``, the
    bf16 product's part with ``h`` rounded as that product rounds it."""
    if fast is None:
        return dot64(h, mean_row)
    rounded = h.to(fast.dtype).to(h.dtype)
    return dot64(h, mean_row - m_fast) + dot64(rounded, m_fast)


@torch.no_grad()
def stats_kl_and_grad(h: Tensor, mean_row: Tensor, m_fast: Tensor, offset: Tensor,
                      weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-token ``KL(ref || student)`` and its gradient with respect to ``h``, the reference
    given by :func:`reference_kl_stats`, the head held fixed."""
    fast = fast_weight(weight)
    shifted, total, lse, split, _ = _student_exp(h, weight, bias, fast)
    value = (offset - cross_term(h, mean_row, m_fast, fast) + lse.double()).to(lse.dtype)
    p_student_w = _through_head(shifted, weight, fast, split) / total[:, None]  # p_s @ W
    return value, (p_student_w - mean_row).to(h.dtype)
