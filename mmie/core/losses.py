"""Language-model losses that never hold a ``[batch, tokens, vocab]`` fp32 tensor.

Gemma 3 has a 262,144-entry vocabulary: the fp32 log-softmax of one 2,048-token batch is 2 GiB
and dominates the cost of a CPU training step. Every function here starts from *final hidden
states* and the LM-head weight instead of logits, visits only real (unmasked) tokens, and does
so ``chunk_size`` tokens at a time. No chunk's ``[chunk, vocab]`` block outlives the chunk:
when only the hidden states are trainable (LoRA, ReFT: the head is frozen) each chunk's
gradient with respect to its hidden rows is computed on the spot and kept (``[chunk, d]``);
when the head is trainable too, the chunk runs under activation checkpointing and backward
recomputes its logits.

Conventions shared by every function:

- ``hidden[b, t]`` predicts ``labels[b, t]``; :func:`shift_labels` builds ``labels`` and
  ``mask`` from ``input_ids`` so hidden states need no slicing.
- ``mask`` is ``[batch, tokens]`` (bool or 0/1); ``None`` means every position is real.
- Logits are ``hidden @ weight.T (+ bias)`` in the weight's dtype, then upcast to fp32 and, if
  ``softcap`` is set, squashed as ``softcap * tanh(logits / softcap)`` (Gemma 2's
  ``final_logit_softcapping``), the same order of operations as the Hugging Face heads.
- Per-token outputs are ``[batch, tokens]`` fp32 with 0 at masked positions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mmie.core import profile
from mmie.core.head_precision import head_product
from mmie.core.kl_grad import full_kl_and_grad, label_logprob_and_grad

# 128 tokens x 262,144 ids x 4 bytes = 128 MiB per chunk: large enough for efficient matmuls,
# small enough to leave room for the model on a laptop.
DEFAULT_CHUNK_SIZE = 128


def head_params(model: torch.nn.Module) -> dict:
    """``lm_head_weight``, ``bias`` and ``softcap`` of a Hugging Face causal LM, as keywords.

    Usage: ``token_logprobs(hidden, labels=..., mask=..., **head_params(model))``.
    """
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    return {
        "lm_head_weight": head.weight,
        "bias": getattr(head, "bias", None),
        "softcap": getattr(config, "final_logit_softcapping", None),
    }


def shift_labels(input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Next-token ``(labels, mask)`` aligned with the hidden states of ``input_ids``.

    ``labels[:, t] = input_ids[:, t + 1]``; a position counts only if both it and the token it
    predicts are real, so the last position and (left) padding are masked.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    real = attention_mask.bool()
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    mask = torch.zeros_like(real)
    mask[:, :-1] = real[:, 1:] & real[:, :-1]
    return labels, mask


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over real positions; refuses an all-padding mask (a data bug)."""
    if mask is None:
        return values.mean()
    count = mask.sum()
    if count == 0:
        raise ValueError("mask selects no tokens: every position is padding")
    return (values * mask).sum() / count


def _complement_logsumexp(logits: Tensor, idx: Tensor) -> Tensor:
    """logsumexp over every id *not* in ``idx``: exact tail mass, without 1 - sum cancellation.

    Rows whose ``idx`` covers the whole vocabulary give -inf (an empty tail).
    """
    taken = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(taken, float("-inf")).logsumexp(-1)


def _requires_grad(t: object) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


class _GradInForward(torch.autograd.Function):
    """Per-token value whose only trainable input is the hidden state: differentiate eagerly.

    Each token's value depends on its own hidden row alone, so ``d sum(values) / d h`` holds
    every token's gradient. Computing it inside forward (one extra matmul while the chunk's
    logits are still live) and saving only that ``[chunk, d]`` gradient makes backward a
    multiply: 2 vocabulary matmuls per chunk instead of checkpointing's 3. Not twice
    differentiable. ``closed``, when given, returns ``(value, gradient)`` itself, without
    autograd (:mod:`mmie.core.kl_grad`).
    """

    @staticmethod
    def forward(ctx, fn, closed, h, *rest):
        if closed is not None:
            value, grad = closed(h.detach(), *rest)
        else:
            with torch.enable_grad():
                leaf = h.detach().requires_grad_(True)
                (value,) = fn(leaf, *rest)
                (grad,) = torch.autograd.grad(value.sum(), leaf)
        ctx.save_for_backward(grad)
        ctx.n_rest = len(rest)
        return value.detach()

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return None, None, upstream[:, None].to(grad.dtype) * grad, *([None] * ctx.n_rest)


def _runner(fn: Callable, args: tuple, single_output: bool,
            closed: Callable | None = None) -> Callable:
    """How to run one chunk so that backward never needs the chunk's [chunk, V] logits."""
    trainable = [_requires_grad(a) for a in args]
    if not torch.is_grad_enabled() or not any(trainable):
        return fn
    if single_output and trainable[0] and not any(trainable[1:]):
        return lambda *a: (_GradInForward.apply(fn, closed, *a),)
    # the head (or a target) is trainable too: recompute the logits in backward instead
    return partial(checkpoint, fn, use_reentrant=False)


def map_tokens(
    fn: Callable[..., tuple[Tensor, ...]],
    mask: Tensor | None,
    per_token: tuple[Tensor, ...],
    shared: tuple,
    chunk_size: int,
    single_output: bool = True,
    closed: Callable | None = None,
) -> tuple[Tensor, ...]:
    """Apply ``fn(*token_chunks, *shared)`` to real tokens in chunks; scatter back to [B, T].

    ``fn`` returns a tuple of per-token tensors; ``single_output`` says it returns exactly one
    (which allows the cheaper :class:`_GradInForward` path, with ``closed`` as its closed form).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = per_token[0].shape[:2]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=per_token[0].device)
    keep = mask.bool()
    if keep.shape != lead:
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match {tuple(lead)}")
    flat = [t[keep] for t in per_token]
    pieces = []
    with profile.phase("lm_head"):
        for start in range(0, flat[0].shape[0], chunk_size):
            args = (*(t[start : start + chunk_size] for t in flat), *shared)
            pieces.append(_runner(fn, args, single_output, closed)(*args))
        if not pieces:  # every position padded: run once on nothing to learn output dtypes
            pieces.append(fn(*(t[:0] for t in flat), *shared))
    return tuple(_unflatten(torch.cat(parts), keep) for parts in zip(*pieces, strict=True))


def _unflatten(values: Tensor, keep: Tensor) -> Tensor:
    out = values.new_zeros((*keep.shape, *values.shape[1:]))
    return out.index_put((keep,), values)


def _label_logprob_chunk(h, labels, weight, bias, softcap):
    logits = head_product(h, weight, bias, softcap, labels[:, None])
    picked = logits.gather(-1, labels[:, None])[:, 0]
    return (picked - logits.logsumexp(-1),)


def token_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    softcap: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``log p(labels[b, t] | hidden[b, t])`` as ``[B, T]`` fp32, 0 where ``mask`` is false.

    ``hidden`` is ``[B, T, d]``, ``lm_head_weight`` ``[V, d]``, ``labels`` ``[B, T]`` ids.
    Differentiable with respect to ``hidden``, ``lm_head_weight`` and ``bias``.
    """
    fn = partial(_label_logprob_chunk, softcap=softcap)
    (out,) = map_tokens(fn, mask, (hidden, labels), (lm_head_weight, bias), chunk_size,
                         closed=partial(label_logprob_and_grad, softcap=softcap))
    return out


def _subset_and_label_chunk(h, labels, weight, bias, softcap, ids):
    logits = head_product(h, weight, bias, softcap, labels[:, None])
    lse = logits.logsumexp(-1)
    picked = logits.gather(-1, labels[:, None])[:, 0]
    return picked - lse, logits.index_select(-1, ids).logsumexp(-1) - lse


@torch.no_grad()
def logprobs_and_subset_mass(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    ids: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    softcap: float | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(log p(label), log sum_{i in ids} p(i))`` per position, ``[B, T]`` each, from one pass
    over the vocabulary per chunk (e.g. the mass on a script's tokens); not differentiable."""
    ids = ids.to(lm_head_weight.device, torch.long)
    fn = partial(_subset_and_label_chunk, softcap=softcap, ids=ids)
    return map_tokens(fn, mask, (hidden, labels), (lm_head_weight, bias), chunk_size,
                       single_output=False)


def sequence_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    softcap: float | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum of token log-probs [B], number of real tokens [B])`` per sequence."""
    logp = token_logprobs(
        hidden, lm_head_weight, labels, mask, chunk_size, softcap=softcap, bias=bias
    )
    counts = logp.new_full(logp.shape, 1.0) if mask is None else mask.to(logp.dtype)
    return logp.sum(-1), counts.sum(-1)


_REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sum": lambda total, count: -total,
    # an all-padding sequence has no tokens to be wrong about: NLL 0, not NaN
    "mean": lambda total, count: -total / count.clamp(min=1),
}


def sequence_nll(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    reduction: str = "mean",
    softcap: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Negative log-likelihood per sequence ``[B]``; ``reduction``: "mean" (per token) or "sum"."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(_REDUCTIONS)}, got {reduction!r}")
    total, count = sequence_logprobs(
        hidden, lm_head_weight, labels, mask, chunk_size, softcap=softcap, bias=bias
    )
    return _REDUCTIONS[reduction](total, count)


def _ref_topk_chunk(h, weight, bias, softcap, k):
    logits = head_product(h, weight, bias, softcap, top=k)
    lse = logits.logsumexp(-1, keepdim=True)
    values, idx = logits.topk(k, dim=-1)
    tail = _complement_logsumexp(logits, idx) - lse[:, 0]
    return idx, values - lse, tail


@torch.no_grad()
def ref_topk(
    ref_hidden: Tensor,
    lm_head_weight: Tensor,
    k: int,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    softcap: float | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference targets for :func:`topk_kl`, computed once per retain example.

    Returns ``(idx [B, T, k] int64, logp [B, T, k] fp32, tail_logmass [B, T] fp32)``: the
    reference's k most likely ids, their log-probabilities, and ``log(1 - sum p_ref(top k))``
    (-inf when k = V). Masked positions hold zeros. Storage is ``k * 12`` bytes per token instead
    of the ``4 * V`` a full reference distribution would need.
    """
    vocab = lm_head_weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
    fn = partial(_ref_topk_chunk, softcap=softcap, k=k)
    shared = (lm_head_weight, bias)
    return map_tokens(fn, mask, (ref_hidden,), shared, chunk_size, single_output=False)


def _topk_kl_chunk(h, idx, ref_logp, ref_tail, weight, bias, softcap):
    logits = head_product(h, weight, bias, softcap, idx)
    lse = logits.logsumexp(-1, keepdim=True)
    student_logp = logits.gather(-1, idx) - lse
    p_ref = ref_logp.exp()
    # a top-k id whose reference probability underflowed to 0 contributes 0, not 0 * -inf
    safe_ref = torch.where(p_ref > 0, ref_logp, torch.zeros_like(ref_logp))
    head = (p_ref * (safe_ref - student_logp)).sum(-1)
    has_tail = ref_tail > float("-inf")
    student_tail = torch.where(has_tail, _complement_logsumexp(logits, idx) - lse[:, 0], 0.0)
    ref_tail = torch.where(has_tail, ref_tail, torch.zeros_like(ref_tail))
    tail = torch.where(has_tail, ref_tail.exp() * (ref_tail - student_tail), 0.0)
    return (head + tail,)


def topk_kl(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    ref_topk_idx: Tensor,
    ref_topk_logp: Tensor,
    ref_tail_logmass: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    softcap: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Per-token ``KL(ref || student)`` on the reference's top k ids plus one tail bucket.

    With K the reference's top-k ids and T = V \\ K, this is the exact KL between the two
    distributions *coarsened* to k + 1 outcomes (each id in K, and "some id in T")::

        sum_{v in K} p(v) log(p(v) / q(v))  +  p(T) log(p(T) / q(T))

    where p is the reference, q the student, and q(T) = 1 - sum_{v in K} q(v) is computed
    exactly from the student's full-vocabulary logits (as a logsumexp over T). By the log-sum
    inequality it is never negative and never exceeds the full KL; it equals the full KL when
    k = V, or when the student's distribution inside T is proportional to the reference's. It
    is 0 when the student matches the reference. Targets come from :func:`ref_topk`.
    Returns ``[B, T]`` fp32 with 0 at masked positions.
    """
    fn = partial(_topk_kl_chunk, softcap=softcap)
    per_token = (student_hidden, ref_topk_idx, ref_topk_logp, ref_tail_logmass)
    (out,) = map_tokens(fn, mask, per_token, (lm_head_weight, bias), chunk_size)
    return out


def _full_kl_chunk(h, ref_h, weight, bias, softcap):
    student = head_product(h, weight, bias, softcap).log_softmax(-1)
    with torch.no_grad():
        ref = head_product(ref_h, weight, bias, softcap).log_softmax(-1)
    return (F.kl_div(student, ref, reduction="none", log_target=True).sum(-1),)


def full_kl(
    student_hidden: Tensor,
    ref_hidden: Tensor,
    lm_head_weight: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    softcap: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Exact per-token ``KL(ref || student)`` over the full vocabulary, chunked; ``[B, T]``.

    Both models share the LM head (adapters and interventions leave it untouched); gradients
    flow only into the student side. Needs the reference's hidden states every step, which is
    what :func:`topk_kl` avoids. With the head frozen the gradient comes in closed form
    (:mod:`mmie.core.kl_grad`).
    """
    fn = partial(_full_kl_chunk, softcap=softcap)
    per_token = (student_hidden, ref_hidden.detach())
    (out,) = map_tokens(fn, mask, per_token, (lm_head_weight, bias), chunk_size,
                         closed=partial(full_kl_and_grad, softcap=softcap))
    return out
