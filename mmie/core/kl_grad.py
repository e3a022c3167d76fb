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
through the bf16 copy. Every reduction stays in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmie.core.head_precision import EXACT_TOP, exact_at, fast_weight, head_product


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
        once = torch.ones_like(top, dtype=torch.float32)
        if also is not None:
            exact_at(logits, h, weight, also)
            once = torch.cat([once.masked_fill((top[:, :, None] == also[:, None]).any(-1), 0),
                              torch.ones_like(also, dtype=torch.float32)], -1)
            top = torch.cat([top, also], -1)
        split = (top, once)
    return (logits if bias is None else logits + bias), split


def _through_head(grad_logits: Tensor, weight: Tensor, fast: Tensor | None,
                  split: tuple | None) -> Tensor:
    """``d loss / d h`` from ``d loss / d logits`` (``grad_logits`` is consumed)."""
    if split is None:
        return grad_logits.to(weight.dtype) @ weight
    idx, once = split
    exact = grad_logits.gather(-1, idx) * once
    grad_logits.scatter_(-1, idx, 0.0)  # those ids' logits did not come from the bf16 product
    return (grad_logits.to(fast.dtype) @ fast).float() + \
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
    logits, split = _student_logits(h, weight, bias, fast, rows)
    squash = None
    if softcap is not None:
        logits = softcap * torch.tanh(logits.div_(softcap))
        squash = 1 - (logits / softcap).square_()
    lse = logits.logsumexp(-1)
    value = logits.gather(-1, rows)[:, 0] - lse
    grad = logits.sub_(lse[:, None]).exp_().neg_()  # -p_s ...
    grad.scatter_add_(-1, rows, torch.ones_like(rows, dtype=grad.dtype))  # ... + onehot(y)
    if squash is not None:
        grad.mul_(squash)
    return value, _through_head(grad, weight, fast, split).to(h.dtype)
