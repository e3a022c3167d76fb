"""Tensor files under ``$MMIE_HOME/cache`` keyed by what their contents depend on.

Shared by the caches of work done once (`unlearn`'s reference targets, `evaluate`'s base-model
fluency pass). A key is a sha256 over a JSON header (the model's fingerprint and load settings,
the torch version, the settings that change the numbers) and the token rows themselves. Off
with ``MMIE_CACHE=0``, and under a launcher (processes would race on the files). A file that
cannot be read is a miss, never an error; writes are atomic (temp file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmie.core.distributed import world
from mmie.core.identity import mmie_home
from mmie.core.models import LoadedModel, input_device

ENV = "MMIE_CACHE"


def enabled() -> bool:
    off = os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off")
    return not off and not world().distributed


def cache_dir(kind: str) -> Path:
    return mmie_home() / "cache" / kind


def model_record(lm: LoadedModel) -> dict:
    """What about the loaded model changes its outputs."""
    param = next(lm.model.parameters())
    return {"fingerprint": lm.identity.fingerprint, "spec": asdict(lm.spec),
            "device": str(input_device(lm.model)), "dtype": str(param.dtype),
            "pad": lm.tokenizer.pad_token_id, "torch": torch.__version__}


def key(header: dict, rows: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None) -> str:
    """sha256 over ``header`` (JSON) and every row with its start (-1: none)."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for j, row in enumerate(rows):
        start = -1 if starts is None else int(starts[j])
        h.update(torch.tensor([len(row), start, *row], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path) if path.is_file() else {}
    except (SafetensorError, OSError, ValueError):  # a damaged file is a miss
        return {}


def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
