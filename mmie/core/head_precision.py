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

Code that calls the head module itself uses the same arithmetic: :func:`head_logits` for the
scoring passes (the label exact too), and :func:`fast_head` while generating, which makes the
model's own head return these logits (each row's top 16 exact). Greedy decoding therefore picks
the fp32 argmax unless it falls outside the bf16 product's top 16 (the bf16 error would have to
exceed the gap between the largest logit and the 16th) or two top logits tie within fp32
rounding (the exact recomputation sums in another order): in practice the continuations are
the fp32 ones. A repetition penalty keeps the pick exact unless it pushes all 16 below the
17th; sampling draws from probabilities within the bound above, not bit-identical ones. Only
a plain bias-free fp32 ``nn.Linear`` head that no accelerate hook moves is computed this way;
any other head keeps its own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        # made outside inference mode even when first asked for inside it (validation, eval):
        # an inference tensor cached here would break the next training step's backward
        with torch.inference_mode(False):
            hit = copies[key] = (weight, weight._version, weight.detach().to(dtype))
    return hit[2]


def fast_logits(h: Tensor, weight: Tensor, fast: Tensor, also: Tensor | None,
                top: int = EXACT_TOP) -> Tensor:
    """fp32 ``h @ weight.T`` from the bf16 product, with each row's ``top`` largest logits and
    the ids in ``also`` (``[rows, k]``, e.g. the labels) recomputed exactly in fp32; ``top``
    gets a margin of :data:`EXACT_TOP` more, so that rounding cannot swap an id in or out of
    the top ``top``."""
    logits = (h.to(fast.dtype) @ fast.T).float()
    logits = exact_at(logits, h, weight, _top_ids(logits.detach(), top))
    # a second scatter, not one over both id sets: an id in both would get its gradient twice
    return logits if also is None else exact_at(logits, h, weight, also.to(torch.long))


def fast_logits_into(h: Tensor, weight: Tensor, fast: Tensor, low: Tensor, out: Tensor,
                     top: int = EXACT_TOP) -> Tensor:
    """:func:`fast_logits` without autograd, written into ``out`` (fp32 ``[rows, V]``) through
    ``low`` (``[rows, V]`` in the fast dtype): buffers a caller keeps across calls, since on CPU
    every fresh tensor of a 262k vocabulary's size is paid in page faults. Same values (the top
    ids are taken from ``low``: ``topk`` picks the same ids there as from its fp32 copy, ties
    included, and reads half the bytes)."""
    torch.mm(h.to(fast.dtype), fast.T, out=low)
    out.copy_(low)
    return exact_at(out, h, weight, _top_ids(low, top))


def head_product(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                 also: Tensor | None = None, top: int = 0) -> Tensor:
    """Logits of hidden rows ``h`` through a head given as tensors (``weight``, ``bias``), as the
    chunked losses (:mod:`mmie.core.losses`) compute them: fp32 at least, then the soft-cap.
    ``also``: ids each row reads ([rows, k]), ``top``: how many of its largest logits it
    reads; under a reduced precision those are computed exactly (:func:`fast_logits`)."""
    fast = fast_weight(weight)
    logits = h.to(weight.dtype) @ weight.T if fast is None else \
        fast_logits(h, weight, fast, also, top)
    if bias is not None:
        logits = logits + bias
    # fp32 at least (fp64 stays fp64, which the exact tests rely on)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _top_ids(logits: Tensor, top: int) -> Tensor:
    return logits.topk(min(top + EXACT_TOP, logits.shape[-1]), dim=-1).indices


def exact_logits(h: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """fp32 logits of the ids ``idx`` (``[rows, k]``) of each row of ``h``, from the fp32 rows."""
    return torch.einsum("nd,nkd->nk", h.float(), weight[idx].float())


def exact_at(logits: Tensor, h: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    exact = exact_logits(h, weight, idx)
    # in place: ``logits`` is this call's own fresh fp32 copy (autograd allows it), and a
    # [rows, vocab] copy costs as much as the logsumexp
    return logits.scatter_(-1, idx, exact)


# --- the head module ------------------------------------------------------------------------

def reduced() -> bool:
    """Whether a reduced-precision head is on (inside ``head_precision("bf16")``)."""
    return _STATE["dtype"] is not None


def plain_linear(head: nn.Module) -> bool:
    """A head whose product this module may compute itself. A bias would move which logits
    are the largest; an accelerate hook (offloading) keeps the real weight elsewhere; a wrapped
    head (PEFT) or one whose forward someone replaced computes more than ``h @ W.T``."""
    return (isinstance(head, nn.Linear) and head.bias is None and "forward" not in vars(head)
            and not hasattr(head, "_hf_hook") and head.weight.dtype == torch.float32)


def head_logits(head: nn.Module, h: Tensor, also: Tensor | None = None) -> Tensor:
    """fp32 logits ``[rows, V]`` of hidden rows ``h`` (``[rows, d]``): ``head(h)`` as it is, or,
    under a reduced precision, :func:`fast_logits` with the ids in ``also`` exact."""
    fast = fast_weight(head.weight) if plain_linear(head) else None
    if fast is None:
        return head(h).float()
    return fast_logits(h, head.weight, fast, also)


class LogitBuffer:
    """:func:`head_logits` (then Gemma's soft-cap, if any) written into buffers kept across
    calls, for inference passes: on CPU every fresh ``[rows, V]`` tensor of a 262k vocabulary is
    new memory paid in page faults, which cost as much as the product itself. The same values
    as :func:`head_logits`; a call's result is valid until the next call. A head that is not a
    plain linear layer is called as it is (no buffer)."""

    def __init__(self, head: nn.Module, softcap: float | None = None) -> None:
        self.head, self.softcap = head, softcap
        self.buffers: dict[str, Tensor] = {}

    def _buffer(self, name: str, rows: int, dtype: torch.dtype) -> Tensor:
        weight, buf = self.head.weight, self.buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.dtype != dtype or buf.device != weight.device:
            buf = self.buffers[name] = torch.empty((rows, weight.shape[0]), dtype=dtype,
                                                   device=weight.device)
        return buf[:rows]

    def __call__(self, h: Tensor, also: Tensor | None = None) -> Tensor:
        if not plain_linear(self.head) or torch.is_grad_enabled():
            out = head_logits(self.head, h, also)
            return self.softcap * torch.tanh(out / self.softcap) if self.softcap else out
        out = self._buffer("out", h.shape[0], torch.float32)
        weight, fast = self.head.weight, fast_weight(self.head.weight)
        if fast is None:
            torch.mm(h, weight.T, out=out)
        else:
            fast_logits_into(h, weight, fast, self._buffer("low", h.shape[0], fast.dtype),
                             out)
            if also is not None:
                exact_at(out, h, weight, also.to(torch.long))
        return out.div_(self.softcap).tanh_().mul_(self.softcap) if self.softcap else out

    def top(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """Under a reduced precision, without writing the fp32 logits: each row's ids that
        :meth:`__call__` would make exact (the reduced product's largest, as many), their exact
        fp32 logits, and the smallest reduced logit among them, which no other logit of the row
        exceeds. None where ``__call__`` computes something else (fp32, a soft-cap, a head that
        is not a plain linear layer, autograd on)."""
        if self.softcap or not plain_linear(self.head) or torch.is_grad_enabled():
            return None
        weight, fast = self.head.weight, fast_weight(self.head.weight)
        if fast is None:
            return None
        low = self._buffer("low", h.shape[0], fast.dtype)
        torch.mm(h.to(fast.dtype), fast.T, out=low)
        values, ids = low.topk(min(2 * EXACT_TOP, low.shape[-1]), dim=-1)
        return ids, exact_logits(h, weight, ids), values[:, -1].float()


def _fast_forward(head: nn.Linear, h: Tensor) -> Tensor:
    fast = fast_weight(head.weight)
    if fast is None:  # fp32 asked for inside the block: the plain product
        return F.linear(h, head.weight)
    flat = h.reshape(-1, h.shape[-1])
    return fast_logits(flat, head.weight, fast, None).view(*h.shape[:-1], -1)


@contextmanager
def fast_head(head: nn.Module) -> Iterator[None]:
    """Inside, calling ``head`` returns :func:`fast_logits` (each row's top :data:`EXACT_TOP`
    exact) when a reduced precision is on; otherwise, or for a head that is not a plain linear
    layer, nothing changes. The head's forward is shadowed on the instance, so a weight tied
    to the embedding stays fp32 and shared; the shadow goes in ``finally``."""
    if not (reduced() and plain_linear(head)):
        yield
        return
    head.forward = partial(_fast_forward, head)
    try:
        yield
    finally:
        del head.forward
