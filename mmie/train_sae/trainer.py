"""The `train-sae` training loop: SAEs, optimisers and stream as one checkpointable state.

Every step draws the global batch from the stream (the same on every process, see
:mod:`mmie.train_sae.stream`) and trains each layer's SAE on this process's rows of it
(:mod:`mmie.sae.shard`, :func:`mmie.train_sae.optim.replica_step`), so one process and ``N``
processes take the same steps.
The decoder bias is initialised from the whole first batch and the running activation means
come from whole batches, so they too agree on every process. Only rank 0 writes checkpoints;
a resumed run reads the checkpoint on every process (several nodes need it on a shared
filesystem).

Checkpoints hold SAEs, optimisers, dead-latent counters, stream position, buffer and RNG state,
written atomically (temp file + rename); a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmie.core.distributed import World, world
from mmie.core.errors import ArtifactError
from mmie.core.progress import Progress
from mmie.sae.modules import SaeConfig, SparseAutoencoder, build_sae
from mmie.sae.shard import split_batch
from mmie.train_sae.optim import Replica, make_optimizer, replica_step
from mmie.train_sae.stream import TokenStream

CHECKPOINT = "state.pt"


@dataclass
class Trainer:
    """Everything a run changes while it trains: what a checkpoint holds."""

    layers: list[int]
    saes: dict[int, SparseAutoencoder]
    optimizers: dict[int, tuple]
    stream: TokenStream
    step: int = 0
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    log: list[dict] = field(default_factory=list)
    replicas: dict[int, Replica] = field(default_factory=dict)  # set once the state is loaded

    def state_dict(self) -> dict:
        per_layer = {str(i): {"sae": self.saes[i].state_dict(),
                              "dead": self.saes[i].tokens_since_fired.cpu(),
                              "opt": self.optimizers[i][0].state_dict(),
                              "sched": self.optimizers[i][1].state_dict(),
                              "sum": self.sums[i]} for i in self.layers}
        return {"step": self.step, "count": self.count, "log": list(self.log),
                "stream": self.stream.state_dict(), "layers": per_layer,
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.count, self.log = state["step"], state["count"], list(state["log"])
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["rng"])
        for i in self.layers:
            saved = state["layers"][str(i)]
            self.saes[i].load_state_dict(saved["sae"], strict=True)
            self.saes[i].tokens_since_fired.copy_(saved["dead"])
            self.optimizers[i][0].load_state_dict(saved["opt"])
            self.optimizers[i][1].load_state_dict(saved["sched"])
            self.sums[i] = saved["sum"]

    def means(self) -> dict[int, torch.Tensor]:
        return {i: (self.sums[i] / max(self.count, 1)).float() for i in self.layers}


class Checkpoints:
    """One checkpoint file, replaced atomically; refuses one written for other settings."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = folder, fingerprint

    def save(self, trainer: Trainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{CHECKPOINT}.tmp-{os.getpid()}"
        torch.save({"fingerprint": self.fingerprint, **trainer.state_dict()}, tmp)
        os.replace(tmp, self.folder / CHECKPOINT)

    def load(self) -> dict | None:
        path = self.folder / CHECKPOINT
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            raise ArtifactError(f"{path}: checkpoint was written for other settings (model, "
                                "data, layers or training options differ); drop --resume")
        return state

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    cuda = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda else None


def new_trainer(device: torch.device, layers: list[int], cfg: SaeConfig, stream: TokenStream,
                seed: int, lr: float, warmup_steps: int) -> Trainer:
    """Freshly initialised SAEs (seeded per layer: identical on every process) and optimisers."""
    saes = {i: build_sae(cfg, device=device,
                         generator=torch.Generator().manual_seed(seed * 7 + i))
            for i in layers}
    optimizers = {i: make_optimizer(saes[i], lr, warmup_steps) for i in layers}
    sums = {i: torch.zeros(cfg.d_model, dtype=torch.float64) for i in layers}
    return Trainer(layers, saes, optimizers, stream, sums=sums)


def train(trainer: Trainer, steps: int, checkpoint_every: int, ckpt: Checkpoints,
          progress: Progress) -> None:
    """Run optimisation steps until ``steps``; rank 0 checkpoints every ``checkpoint_every``."""
    here = world()
    log_every = max(1, steps // 50)
    with progress.task("train SAEs", total=steps) as task:
        task.advance(trainer.step)
        while trainer.step < steps:
            stats = _step(trainer, here)
            if trainer.step % log_every == 0 or trainer.step == steps:
                trainer.log += [{"step": trainer.step, "layer": i, **s} for i, s in stats.items()]
            task.advance(fvu=_mean(stats, "fvu"), l0=_mean(stats, "l0"))
            if trainer.step % checkpoint_every == 0 and trainer.step < steps and here.main:
                ckpt.save(trainer)


def _step(trainer: Trainer, here: World) -> dict[int, dict[str, float]]:
    device = next(iter(trainer.saes.values())).W_enc.device
    batch = {i: x.to(device) for i, x in trainer.stream.next_batch().items()}
    if trainer.step == 0:
        for i, sae in trainer.saes.items():
            sae.init_b_dec(batch[i])
    stats = {}
    for i, rep in trainer.replicas.items():
        rows, shard = split_batch(batch[i], here)
        stats[i] = replica_step(rep, rows, shard, autocast_dtype=_autocast_dtype(device))
    for i, x in batch.items():
        trainer.sums[i] += x.double().sum(0).cpu()
    trainer.count += next(iter(batch.values())).shape[0]
    trainer.step += 1
    return stats


def _mean(stats: dict[int, dict], key: str) -> float:
    return sum(s[key] for s in stats.values()) / len(stats)
