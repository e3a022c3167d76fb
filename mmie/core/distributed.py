"""Data parallelism through the engines users already run: torchrun / accelerate launch.

mmie adds no distribution layer of its own. A stage started by ``torchrun --nproc_per_node N``
or ``accelerate launch --multi_gpu --num_processes N`` finds ``WORLD_SIZE`` / ``RANK`` /
``LOCAL_RANK`` in its environment; :func:`accelerator` then builds an
:class:`accelerate.Accelerator` (DDP over NCCL on GPUs, over gloo on CPU) and the stage wraps
its trainable module with it. accelerate's sharded engines are not used (``unlearn`` shards a
LoRA model with torch's FSDP itself, :mod:`mmie.unlearn.fsdp`); :func:`sharded_engine` tells a
stage that its accelerate config asks for one.

This module holds only what every stage shares: who am I (:func:`world`), which share of a
list is mine (:func:`shard`), waiting for the others (:func:`barrier`) and collecting
per-process results on every process in rank order (:func:`gather`). Outside a launcher all of
them are no-ops for a single process, so library callers and tests need nothing special.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from mmie.core.errors import MmieError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes artifacts and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world() -> World:
    """Read the launcher's environment (torchrun, accelerate launch and MPI spell it alike)."""
    size = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0)
    local = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local)


def local_device(device: torch.device) -> torch.device:
    """A process's own GPU under a launcher: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    here = world()
    if here.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", here.local_rank)
    return device


def accelerator():
    """The Accelerator for this process (a plain single-process one outside a launcher).

    ``cpu=True`` without CUDA matters: accelerate only picks the gloo backend for CPU processes
    when told they are CPU processes; otherwise each would silently train alone.
    """
    from accelerate import Accelerator  # heavy import, only for the stages that train

    return Accelerator(cpu=not torch.cuda.is_available())


# what ``accelerate launch`` exports for a sharded config (accelerate/utils/launch.py)
_SHARDED_FLAGS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED",
                  "ACCELERATE_USE_MEGATRON_LM": "MEGATRON_LM"}


def sharded_engine() -> str | None:
    """The sharded engine ``accelerate launch``'s config asks for, or None.

    Read from the environment because ``Accelerator(cpu=True)`` ignores an FSDP config and
    reports plain data parallelism, so a stage that refuses sharding must look here too.
    """
    for flag, name in _SHARDED_FLAGS.items():
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            return name
    return None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def ensure_group() -> None:
    """Join the process group when launched and not yet joined (gloo on CPU, NCCL on GPU)."""
    here = world()
    if here.distributed and not _initialized():
        if torch.cuda.is_available():
            # NCCL collectives (all_gather_object too) run on the current device: without this
            # every rank would use cuda:0 and NCCL refuses duplicate GPUs
            torch.cuda.set_device(here.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shard(items: Sequence[T], here: World | None = None) -> list[T]:
    """This process's share: every ``size``-th item from ``rank``, so shares differ by <= 1."""
    here = here or world()
    return list(items[here.rank::here.size])


def barrier() -> None:
    """Wait for every process (a no-op for one)."""
    if _initialized():
        dist.barrier()


def gather(obj: T) -> list[T]:
    """Every process's ``obj`` in rank order, on every process (``[obj]`` for one process)."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """Undo :func:`shard`: interleave rank-ordered shares back into the original order."""
    total = sum(len(p) for p in parts)
    merged: list = [None] * total
    for rank, part in enumerate(parts):
        merged[rank::len(parts)] = list(part)
    return merged


def main_writes(write: Callable[[], T], reopen: Callable[[], T], what: str) -> T:
    """Rank 0 runs ``write``; the other processes wait for it, then ``reopen`` what it wrote.

    Rank 0's outcome is shared (the gather is also the barrier), so when it fails every
    process raises instead of waiting for an artifact that never comes.
    """
    here = world()
    if not here.distributed:
        return write()
    result, error = None, None
    if here.main:
        try:
            result = write()
        except Exception as exc:  # noqa: BLE001 - told to the other ranks, then re-raised
            error = exc
    failure = gather(None if error is None else f"{type(error).__name__}: {error}")[0]
    if error is not None:
        raise error
    if failure is not None:
        raise MmieError(f"rank 0 failed to write {what}: {failure}")
    return result if here.main else reopen()
