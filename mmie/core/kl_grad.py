"""The exact full-vocabulary KL of one chunk of tokens and its gradient, in closed form.

``KL(ref || student)`` per token, with ``p_s = softmax(z_s)`` and ``p_r = softmax(z_r)`` over the
whole vocabulary, has the gradient ``p_s - p_r`` with respect to the student's logits (times
``1 - (z_s / c)^2`` under a soft-cap ``c``), and then ``(p_s - p_r) @ W`` with respect to the
student's hidden row. Autograd reaches the same numbers through the log-softmax and the KL's
elementwise graph, about a dozen ``[chunk, vocabulary]`` tensors per chunk; for Gemma 3's
262,144 ids those passes over memory cost more than the head's matmuls. This module computes
the value and the gradient in a handful of passes; :func:`mmie.core.losses.full_kl` uses it
when only the hidden states are trained (LoRA, ReFT: the head is frozen), and autograd
otherwise.

Under ``head_precision("bf16")`` the logits are :func:`mmie.core.head_precision.fast_logits`'
(bf16 product, each row's largest logits exact in fp32) and the gradient follows the same split,
as autograd through that function would: the exact ids through the fp32 weight rows, the rest
through the bf16 copy. Every reduction stays in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmie.core.head_precision import EXACT_TOP, fast_logits, fast_weight


def _student_logits(h: Tensor, weight: Tensor, bias: Tensor | None,
                    fast: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """fp32 logits before any soft-cap, and the ids computed exactly (None: all of them)."""
    if fast is None:
        logits = (h.to(weight.dtype) @ weight.T).to(torch.promote_types(weight.dtype,
                                                                         torch.float32))
        idx = None
    else:
        logits = (h.to(fast.dtype) @ fast.T).float()
        idx = logits.topk(min(EXACT_TOP, logits.shape[-1]), dim=-1).indices
        exact = torch.einsum("nd,nkd->nk", h.float(), weight[idx].float())
        logits.scatter_(-1, idx, exact)
    return (logits if bias is None else logits + bias), idx


def _reference_logits(h: Tensor, weight: Tensor, bias: Tensor | None, fast: Tensor | None,
                      softcap: float | None) -> Tensor:
    logits = h.to(weight.dtype) @ weight.T if fast is None else \
        fast_logits(h, weight, fast, None, 0)
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return softcap * torch.tanh(logits / softcap) if softcap is not None else logits


def _through_head(grad_logits: Tensor, weight: Tensor, fast: Tensor | None,
                  idx: Tensor | None) -> Tensor:
    """``d loss / d h`` from ``d loss / d logits`` (``grad_logits`` is consumed)."""
    if fast is None:
        return grad_logits.to(weight.dtype) @ weight
    exact = grad_logits.gather(-1, idx)
    grad_logits.scatter_(-1, idx, 0.0)  # those ids' logits did not come from the bf16 product
    return (grad_logits.to(fast.dtype) @ fast).float() + \
        torch.einsum("nk,nkd->nd", exact, weight[idx].float())


@torch.no_grad()
def full_kl_and_grad(h: Tensor, ref_h: Tensor, weight: Tensor, bias: Tensor | None,
                     softcap: float | None) -> tuple[Tensor, Tensor]:
    """Per-token ``KL(ref || student)`` (``[chunk]``) and its gradient with respect to ``h``
    (``[chunk, d]``, in ``h``'s dtype), the head ``weight`` (and ``bias``) held fixed."""
    fast = fast_weight(weight)
    logits, idx = _student_logits(h, weight, bias, fast)
    if softcap is not None:
        logits = softcap * torch.tanh(logits.div_(softcap))
    student = logits.log_softmax(-1)
    ref = _reference_logits(ref_h, weight, bias, fast, softcap).log_softmax(-1)
    p_ref = ref.exp()
    value = torch.linalg.vecdot(p_ref, ref.sub_(student))
    del ref
    grad = student.exp_().sub_(p_ref)  # p_s - p_r
    if softcap is not None:
        grad.mul_(1 - (logits / softcap).square_())
    return value, _through_head(grad, weight, fast, idx).to(h.dtype)
