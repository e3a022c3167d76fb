"""`mmie model info`: what a model is, as mmie sees it."""

from __future__ import annotations

from typing import Annotated

import typer

from mmie.cli.app import model_app
from mmie.cli.common import (
    BlocksPathOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    emit_json,
    model_spec,
    out,
    run_guarded,
)


def _info(spec) -> dict:
    from mmie.core.models import loaded

    with loaded(spec) as lm:
        params = sum(p.numel() for p in lm.model.parameters())
        ident = lm.identity.to_dict()
        return {**ident, "parameters": params, "blocks": type(lm.blocks[0]).__name__,
                "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                "device": str(lm.device), "block_devices": _block_devices(lm)}


def _block_devices(lm) -> str:
    """Where each block computes, in runs: '0-1 cpu, 2-3 cuda:0 (offloaded)'."""
    runs: list[list] = []
    for i, block in enumerate(lm.blocks):
        offloaded = any(p.device.type == "meta" for p in block.parameters())
        where = f"{lm.block_device(i)}{' (offloaded)' if offloaded else ''}"
        if runs and runs[-1][2] == where:
            runs[-1][1] = i
        else:
            runs.append([i, i, where])
    return ", ".join(f"{a}{f'-{b}' if b > a else ''} {where}" for a, b, where in runs)


@model_app.command("info")
def info(
    model: Annotated[str, typer.Argument(help="'default', a folder, a .gguf, a hub id or tiny:*.")],
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    blocks_path: BlocksPathOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Architecture, layers, d_model, vocabulary, parameter count, fingerprint, placement."""
    data = run_guarded(lambda: _info(model_spec(model, device, dtype, device_map, blocks_path,
                                                max_memory)))
    if json_out:
        emit_json(data)
        return
    for key in ("name", "arch", "n_layers", "d_model", "vocab_size", "parameters", "blocks",
                "dtype", "device", "block_devices"):
        out.print(f"[bold]{key:>11}[/] {data[key]:,}" if isinstance(data[key], int)
                  else f"[bold]{key:>11}[/] {data[key]}")
    for key, value in data["fingerprint"].items():
        out.print(f"[bold]{key:>11}[/] {value}")
