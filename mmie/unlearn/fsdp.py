"""`unlearn --method lora` under an FSDP accelerate config: the whole PEFT model sharded (FSDP2).

Asked for by ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (which exports
``ACCELERATE_USE_FSDP=true``; under ``torchrun`` set that variable yourself). The model is sharded
with torch's ``fully_shard`` directly rather than through ``accelerator.prepare``: accelerate
refuses FSDP on CPU processes (it silently runs plain data parallelism), and the training loop
calls the decoder body, not the causal-LM wrapper, so the body must be the root unit.

Units: every decoder block, then the decoder body (embeddings, final norm) as the root; an
untied LM head is a unit of its own that is never called, only gathered (:func:`gathered_head`)
for the chunked log-probabilities, which read its weight outside any forward. A head tied to
the input embeddings keeps the unsharded weight it was loaded with (one full copy per process:
sharding it with the body would hand the loss a shard).

Gradients: FSDP2 reduce-scatters the mean over processes, as DDP all-reduces it, so the
per-process loss scaling of :mod:`mmie.unlearn.train` applies unchanged.

Not supported under FSDP (refused by :func:`check`): ReFT (its interventions are hooks outside
the sharded modules), passes that stop early at a block (RMU), intermediate checkpoints and
``--resume`` (they would need a sharded optimizer state format).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mmie.core import losses
from mmie.core.distributed import sharded_engine, world
from mmie.core.models import LoadedModel, get_decoder, unwrap


def wanted() -> bool:
    """The launcher's accelerate config asks for FSDP."""
    return sharded_engine() == "FSDP"


def check(method: str, act_layer: int | None, checkpoint_every: int, resume: bool) -> None:
    """Refuse, before any loading, what the FSDP path does not do."""
    problems = []
    if method != "lora":
        problems.append(f"--method {method} (only lora)")
    if act_layer is not None:
        problems.append("an objective that reads block activations (RMU)")
    if checkpoint_every:
        problems.append("intermediate checkpoints (pass --checkpoint-every 0)")
    if resume:
        problems.append("--resume")
    if problems:
        raise ValueError("under an FSDP accelerate config unlearn does not support "
                         + "; ".join(problems))


def shard(lm: LoadedModel) -> None:
    """Shard ``lm.model`` (already carrying its LoRA layers) over the launched processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(lm.model.parameters()).device
    mesh = init_device_mesh(device.type, (world().size,))
    for block in lm.blocks:
        fully_shard(block, mesh=mesh)
    body = get_decoder(lm.model)
    head = unwrap(lm.model).get_output_embeddings()
    if not _tied(lm):
        fully_shard(head, mesh=mesh)
    fully_shard(body, mesh=mesh)


def _tied(lm: LoadedModel) -> bool:
    base = unwrap(lm.model)
    return base.get_output_embeddings().weight is base.get_input_embeddings().weight


@contextmanager
def gathered_head(lm: LoadedModel) -> Iterator[dict]:
    """:func:`mmie.core.losses.head_params` with the head's full weight, for one step.

    Keep the step's backward inside: the matmul saved the gathered weight for it, and
    resharding frees that storage.
    """
    from torch.distributed.fsdp import FSDPModule

    head = unwrap(lm.model).get_output_embeddings()
    sharded = isinstance(head, FSDPModule)
    if sharded:
        head.unshard()
    try:
        yield losses.head_params(unwrap(lm.model))
    finally:
        if sharded:
            head.reshard()


def grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the sharded gradients to a global norm; returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def gather_trainable(adapter) -> None:
    """Replace each sharded trainable parameter by its full tensor, on every process.

    A collective (every process must call it) for the end of training: afterwards PEFT's
    ``save_pretrained`` on rank 0 writes plain LoRA tensors. LoRA weights are small, so a full
    copy on each process costs little.
    """
    from torch.distributed.tensor import DTensor

    model = adapter.peft_model  # the names of adapter.trainable() are relative to it
    for name in adapter.trainable():
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        param = getattr(module, attr)
        if isinstance(param, DTensor):
            setattr(module, attr, nn.Parameter(param.full_tensor().detach(), requires_grad=False))
