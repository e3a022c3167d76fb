"""Batch-level sharding: N processes compute exactly what one process computes.

A row's result depends slightly (numerically) on which rows share its padded batch, so
handing items to processes one by one would make N processes disagree with one. Instead every
process builds the batches a single process would (:func:`length_batches`), runs every
``size``-th *batch* from its rank (:func:`run_share`), and the per-item results are gathered and
put back in input order (:func:`merge_shares`). Every batch is then computed with the same rows
as in a one-process run, so greedy outputs are identical, not merely close.

Outside a launcher (or with ``here=None``) :func:`map_batches` runs every batch in this
process and no collective is called: sharding is opted into by the caller, because a gather
needs every process to call it with the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from mmie.core.data import batched
from mmie.core.distributed import World, gather, shard
from mmie.core.progress import SILENT, Progress

T = TypeVar("T")

# batch number, item indices of the batch -> one result per index, in the same order
BatchFn = Callable[[int, list[int]], Sequence[T]]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices sorted by length (ties keep input order), cut into batches: little padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [list(chunk) for chunk in batched(order, batch_size)]


def run_share(plan: Sequence[list[int]], fn: BatchFn, here: World, *,
              progress: Progress = SILENT, desc: str = "") -> dict[int, T]:
    """Run this process's batches of ``plan`` (every ``size``-th from ``rank``): item -> result."""
    mine = shard(range(len(plan)), here)
    results: dict[int, T] = {}
    for number in progress.track(mine, total=len(mine), desc=desc):
        results.update(zip(plan[number], fn(number, plan[number]), strict=True))
    return results


def merge_shares(shares: Sequence[Mapping[int, T]], n: int) -> list[T]:
    """The rank-ordered shares as one list in input order; every item exactly once."""
    merged: dict[int, T] = {}
    for share in shares:
        twice = merged.keys() & share.keys()
        if twice:
            raise ValueError(f"items computed by two processes: {sorted(twice)[:5]}")
        merged.update(share)
    missing = set(range(n)) - merged.keys()
    if missing or len(merged) != n:
        raise ValueError(f"{len(missing)} of {n} items have no result, e.g. {sorted(missing)[:5]}")
    return [merged[i] for i in range(n)]


def map_batches(plan: Sequence[list[int]], fn: BatchFn, n: int, *, here: World | None = None,
                progress: Progress = SILENT, desc: str = "") -> list[T]:
    """``fn`` over every batch of ``plan``, shared among ``here``'s processes; all ``n`` results
    in input order on every process (a collective: every process must call it alike)."""
    here = here or World()
    local = run_share(plan, fn, here, progress=progress, desc=desc)
    if not here.distributed:
        return merge_shares([local], n)
    shares = gather(local)
    if len(shares) != here.size:
        raise RuntimeError(f"{here.size} processes launched but {len(shares)} joined the gather; "
                           "call mmie.core.distributed.ensure_group() first")
    return merge_shares(shares, n)
