"""Reduced-precision LM head for the chunked losses (:mod:`mmie.core.losses`), fp32 where it
matters.

On CPUs with AVX-512 BF16 / AMX a ``[chunk, d] x [d, V]`` matmul in bf16 is about 3x faster
than in fp32 (``bench/bench_head.py``), and for Gemma 3's 262,144-id vocabulary that matmul is
most of a step. But the product is *rounded to bf16*: a logit near 30 is off by up to 0.06
nats, which would move a log-probability by as much. So under ``head_precision("bf16")``:

- the head's weight is cast to bf16 once (kept while its version does not change);
- every chunk's logits come from the bf16 matmul, upcast to fp32;
- the logits that carry most of the probability (each row's :data:`EXACT_TOP` largest) and
  the ones a loss reads (the label, the reference's top-k ids) are recomputed exactly, in fp32,
  from the fp32 weight rows (a ``[chunk, k, d]`` gather: cheap);
- every reduction (logsumexp, log-softmax, top-k, KL sums) stays in fp32.

What remains is the rounding of the many small logits, each relative error <= 2^-9, whose
effect on the logsumexp averages out; ``tests/test_head_precision.py`` bounds the difference
against fp32. Off (``fp32``, the default) nothing changes, bit for bit. A trainable head gets
its gradient through both paths (its bf16 copy is then cast on every call, not cached).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

HEAD_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
EXACT_TOP = 16  # per row: enough to hold nearly all of a peaked distribution's mass

_STATE: dict = {"dtype": None, "copies": {}}


@contextmanager
def head_precision(name: str) -> Iterator[None]:
    """Compute the chunked LM head in ``name`` ("fp32" or "bf16") inside the block."""
    if name not in HEAD_DTYPES:
        raise ValueError(f"head dtype must be one of {sorted(HEAD_DTYPES)}, got {name!r}")
    before = dict(_STATE)
    _STATE.update(dtype=HEAD_DTYPES[name], copies={})
    try:
        yield
    finally:
        _STATE.update(before)


def fast_weight(weight: Tensor) -> Tensor | None:
    """The reduced-precision copy of an fp32 head weight, or None when it is not wanted."""
    dtype = _STATE["dtype"]
    if dtype is None or weight.dtype != torch.float32:
        return None
    if weight.requires_grad:  # keep the graph: a cached detached copy would drop its gradient
        return weight.to(dtype)
    key, copies = id(weight), _STATE["copies"]
    hit = copies.get(key)
    if hit is None or hit[0] is not weight or hit[1] != weight._version:
        hit = copies[key] = (weight, weight._version, weight.detach().to(dtype))
    return hit[2]


def fast_logits(h: Tensor, weight: Tensor, fast: Tensor, also: Tensor | None,
                top: int = EXACT_TOP) -> Tensor:
    """fp32 ``h @ weight.T`` from the bf16 product, with each row's ``top`` largest logits and
    the ids in ``also`` (``[rows, k]``, e.g. the labels) recomputed exactly in fp32; ``top``
    gets a margin of :data:`EXACT_TOP` more, so that rounding cannot swap an id in or out of
    the top ``top``."""
    logits = (h.to(fast.dtype) @ fast.T).float()
    k = min(top + EXACT_TOP, logits.shape[-1])
    logits = _exact_at(logits, h, weight, logits.detach().topk(k, dim=-1).indices)
    # a second scatter, not one over both id sets: an id in both would get its gradient twice
    return logits if also is None else _exact_at(logits, h, weight, also.to(torch.long))


def _exact_at(logits: Tensor, h: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    exact = torch.einsum("nd,nkd->nk", h.float(), weight[idx].float())
    # in place: ``logits`` is this call's own fresh fp32 copy (autograd allows it), and a
    # [rows, vocab] copy costs as much as the logsumexp
    return logits.scatter_(-1, idx, exact)
