"""`mmie model info`: what a model is, as mmie sees it."""

from __future__ import annotations

from typing import Annotated

import typer

from mmie.cli.app import model_app
from mmie.cli.common import (
    BlocksPathOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    emit_json,
    model_spec,
    out,
    run_guarded,
)


def _info(spec) -> dict:
    from mmie.models import loaded

    with loaded(spec) as lm:
        params = sum(p.numel() for p in lm.model.parameters())
        ident = lm.identity.to_dict()
        return {**ident, "parameters": params, "blocks": type(lm.blocks[0]).__name__,
                "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                "device": str(lm.device)}


@model_app.command("info")
def info(
    model: Annotated[str, typer.Argument(help="'default', a folder, a .gguf, a hub id or tiny:*.")],
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    blocks_path: BlocksPathOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Architecture, layers, d_model, vocabulary, parameter count and fingerprint."""
    data = run_guarded(lambda: _info(model_spec(model, device, dtype, None, blocks_path)))
    if json_out:
        emit_json(data)
        return
    for key in ("name", "arch", "n_layers", "d_model", "vocab_size", "parameters", "blocks",
                "dtype", "device"):
        out.print(f"[bold]{key:>11}[/] {data[key]:,}" if isinstance(data[key], int)
                  else f"[bold]{key:>11}[/] {data[key]}")
    for key, value in data["fingerprint"].items():
        out.print(f"[bold]{key:>11}[/] {value}")
