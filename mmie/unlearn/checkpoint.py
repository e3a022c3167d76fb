"""Checkpoints of an unlearning run: adapter weights, optimizer, RNG and the curve so far.

A checkpoint lives in ``.{out name}.checkpoint`` beside the artifact (a sibling, not inside it,
so the artifact folder only ever holds a complete, hash-checked artifact) and is swapped in
atomically. It records the run's settings; ``--resume`` continues only when they match, except
for :data:`RESUMABLE_CHANGES`. Under a launcher only rank 0 writes it and every process reads
it: the processes hold identical weights and optimizer state (DDP keeps them in step), and the
checkpoint records the global batch's progress, so a run may resume with another number of
processes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from mmie.core.errors import MmieError
from mmie.core.provenance import setting_changes


class Trainer(Protocol):
    """What a checkpoint reads and restores of :class:`mmie.unlearn.train.Trainer` (a protocol,
    so this module stays below the training loop that imports it)."""

    params: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    adapter: Any

# settings that may change between a checkpoint and --resume: they change no weight. The
# learning rate and clipping do, so changing them would leave an artifact that records only
# the new value and lies about how it was trained.
RESUMABLE_CHANGES = ("checkpoint_every",)


def checkpoint_dir(out: Path | str) -> Path:
    """Beside the artifact, not inside it: the artifact folder only ever holds a whole one."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def run_identity(settings: dict) -> dict:
    """The settings a checkpoint must match to be resumed."""
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


def kept_message(ckpt: Path) -> str:
    """What a diverged run leaves behind, for its error message."""
    if not (ckpt / "state.json").is_file():
        return "no checkpoint was written yet; lower --lr and rerun"
    return (f"the last good checkpoint is kept in {ckpt} (for inspection: --resume accepts it "
            "only with the same settings); lower --lr and rerun without --resume")


def save_checkpoint(path: Path, trainer: Trainer, curve: list[dict], identity: dict) -> None:
    """Adapter weights, optimizer, RNG and the curve so far; swapped in atomically."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainer.params.items()},
                  str(tmp / "adapter.safetensors"))
        torch.save({"optimizer": trainer.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
        state = {"step": len(curve), "curve": curve, "run": identity}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True, default=str))
        _swap(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half checkpoint; re-raised
        raise


def _swap(tmp: Path, path: Path) -> None:
    old = path.with_name(path.name + f".old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, trainer: Trainer, identity: dict) -> list[dict]:
    """Restore a checkpoint written for the same run settings; returns the curve so far."""
    state = json.loads((path / "state.json").read_text())
    if changes := setting_changes(state["run"], identity, ignore=RESUMABLE_CHANGES):
        raise MmieError(f"{path}: checkpoint was written with other settings or inputs "
                        f"({'; '.join(changes)}); rerun without --resume, or with the original "
                        "settings and data")
    trainer.adapter.load_trainable(load_file(str(path / "adapter.safetensors")))
    bundle = torch.load(path / "trainer.pt", weights_only=True)
    trainer.optimizer.load_state_dict(bundle["optimizer"])
    torch.set_rng_state(bundle["torch_rng"])
    return list(state["curve"])
