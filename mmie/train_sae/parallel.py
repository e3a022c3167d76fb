"""`train-sae` under torchrun / accelerate launch: the engine's wrappers, a shared folder, rank 0.

Each SAE goes through ``accelerator.prepare`` with its optimiser (DDP over gloo on CPU, NCCL on
GPUs; :func:`mmie.core.distributed.accelerator`), and its backward through ``accelerator.backward``.
The warm-up scheduler is deliberately not prepared: accelerate steps a prepared scheduler once
per process per optimisation step, which would end the warm-up ``world`` times too early, while
here the global batch, hence one step, is the same for any number of processes.

SAEs always train data-parallel: each is small, and the unit-norm decoder constraint needs
whole decoder rows. Under an FSDP / DeepSpeed / Megatron accelerate config (meant for the large
models `unlearn` trains; `train-sae` only runs its model forward) they are therefore wrapped in
torch's DistributedDataParallel directly, the module accelerate's own DDP path returns, rather
than sharded, so one accelerate config can serve the whole pipeline.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmie.core.distributed import accelerator, barrier, gather, world
from mmie.sae.modules import SparseAutoencoder
from mmie.train_sae.optim import Replica

T = TypeVar("T")
SHARDED = frozenset({"FSDP", "DEEPSPEED", "MEGATRON_LM"})


def replicate(saes: dict[int, SparseAutoencoder], optimizers: dict[int, tuple]
              ) -> dict[int, Replica]:
    """Each SAE as this process trains it: plain alone, the engine's wrapper under a launcher."""
    if not world().distributed:
        return {i: Replica(sae, *optimizers[i]) for i, sae in saes.items()}
    engine = accelerator()
    if str(getattr(engine.distributed_type, "value", engine.distributed_type)) in SHARDED:
        return {i: Replica(sae, *optimizers[i], module=plain_ddp(sae)) for i, sae in saes.items()}
    replicas = {}
    for i, sae in saes.items():
        optimizer, scheduler = optimizers[i]
        module, prepared = engine.prepare(sae, optimizer)
        replicas[i] = Replica(sae, prepared, scheduler, module, engine.backward)
    return replicas


def plain_ddp(sae: SparseAutoencoder) -> DistributedDataParallel:
    """``sae`` in torch's DDP (on its own GPU, or on CPU over gloo): the sharded configs' path."""
    device = sae.W_enc.device
    return DistributedDataParallel(sae, device_ids=[device] if device.type == "cuda" else None)


@contextmanager
def shared_folder(path: str | None, prefix: str) -> Iterator[Path]:
    """``path``, or a temporary folder rank 0 makes, every process uses and rank 0 removes.

    The temporary folder is on rank 0's machine: runs over several nodes need ``path`` on a
    shared filesystem.
    """
    if path:
        yield Path(path)
        return
    made = tempfile.mkdtemp(prefix=prefix) if world().main else None
    folder = Path(gather(made)[0])
    try:
        yield folder
        barrier()  # no process may still be reading when rank 0 removes it
    finally:
        if world().main:
            shutil.rmtree(folder, ignore_errors=True)


def gather_to_main(obj: T) -> list[T] | None:
    """Every process's ``obj`` in rank order on rank 0; None elsewhere (``[obj]`` alone)."""
    here = world()
    if not here.distributed:
        return [obj]
    out: list | None = [None] * here.size if here.main else None
    dist.gather_object(obj, out, dst=0)
    return out
