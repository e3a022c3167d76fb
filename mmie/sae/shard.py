"""One process's rows of a global SAE batch, and the few reductions that make it act whole.

Under a launcher every process draws the same global batch from the same seeded stream and
trains on its own contiguous block of rows (:func:`split_batch`). What the single-process step
computes from the whole batch must then be the same on every process:

- the FVU denominator ``sum ||x - mean(x)||^2`` comes from the global batch (each process holds
  it), so each process's loss is its exact share of the global loss;
- BatchTopK's cut is the ``k * tokens``-th largest candidate over all processes
  (:meth:`BatchShard.kth_largest`; the global top set lies within the union of local top sets);
- counters and statistics (latents fired, the smallest kept activation, logged losses) are
  all-reduced over the default process group, the one the launcher's engine created.

For one process (``world == 1``) every reduction returns its input unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mmie.core.distributed import World


def variance_total(x2: Tensor) -> Tensor:
    """The FVU denominator of a ``[tokens, d]`` batch (clamped: a constant batch stays finite)."""
    return (x2 - x2.mean(0)).pow(2).sum().clamp_min(1e-12)


@dataclass(frozen=True)
class BatchShard:
    """What a process's share of a batch needs to know about the whole batch."""

    total: Tensor
    """:func:`variance_total` of the global batch."""
    tokens: int
    """Rows of the global batch."""
    world: int = 1
    """Processes holding a share of the batch (1: the share is the batch)."""

    @classmethod
    def whole(cls, x2: Tensor) -> BatchShard:
        return cls(variance_total(x2), x2.shape[0])

    def _reduce(self, t: Tensor, op: dist.ReduceOp) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        """``t`` summed over processes, in place."""
        return self._reduce(t, dist.ReduceOp.SUM)

    def min_(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.MIN)

    def any_(self, flag: Tensor) -> bool:
        """Whether ``flag`` (a boolean scalar) holds on any process."""
        return bool(self._reduce(flag.to(torch.int32), dist.ReduceOp.MAX))

    def kth_largest(self, values: Tensor, k: int) -> Tensor:
        """The ``k``-th largest entry of ``values`` over every process (``k`` <= their count)."""
        top = values.topk(min(k, values.numel()), sorted=False).values
        if self.world > 1:
            # Equal-sized messages: pad a short share with -inf, which never ranks in the top k.
            padded = torch.full((k,), -torch.inf, dtype=top.dtype, device=top.device)
            padded[:top.numel()] = top
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
            top = torch.cat(parts).topk(k, sorted=False).values
        return top.min()


def split_batch(x: Tensor, here: World, dtype: torch.dtype = torch.float32
                ) -> tuple[Tensor, BatchShard]:
    """This process's contiguous block of the rows of ``x [tokens, d]``, and its shard view."""
    x2 = x.reshape(-1, x.shape[-1])
    total = variance_total(x2.to(dtype))
    if here.size > x2.shape[0]:
        raise ValueError(f"a batch of {x2.shape[0]} tokens cannot feed {here.size} processes")
    return x2.tensor_split(here.size)[here.rank], BatchShard(total, x2.shape[0], here.size)
