"""`mmie train-sae`: sparse autoencoders on the chosen layers, then the forget-language latents."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmie.cli.app import app
from mmie.cli.common import (
    BlocksPathOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelOpt,
    OutOpt,
    SeedOpt,
    console,
    emit_json,
    info,
    model_spec,
    progress,
    run_guarded,
    writes,
)
from mmie.cli.options import BatchSizeOpt, FieldOpt, MaxSamplesOpt


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(metrics: dict) -> Table:
    table = Table(title="mmie train-sae: held-out quality")
    for column in ("layer", "FVU", "expl. var", "L0", "dead", "CE clean", "CE sae",
                   "CE ablated", "CE recovered"):
        table.add_column(column, justify="right")
    for layer, q in metrics["layers"].items():
        table.add_row(layer, *(_fmt(q.get(k)) for k in (
            "fvu", "explained_variance", "mean_l0", "dead_fraction", "ce_clean", "ce_sae",
            "ce_ablated", "ce_recovered")))
    return table


def _top_features(artifact, shown: int = 3) -> None:
    import json

    report = json.loads(artifact.read_text("features.json"))
    for layer, body in report["layers"].items():
        for row in body["features"][:shown]:
            context = row["contexts"][0]["context"] if row["contexts"] else "-"
            console.print(f"layer {layer} latent {row['latent']}: score {row['score']:.3g}, "
                          f"selectivity {row['selectivity']:.2f}  {context!r}", markup=False)


@app.command("train-sae")
def train_sae_cmd(
    forget: Annotated[str, typer.Option("--forget", help="Texts of the language to forget.")],
    retain: Annotated[str, typer.Option("--retain", help="Texts of a language to keep.")],
    out: OutOpt,
    model: ModelOpt = "default",
    layers: Annotated[Path | None, typer.Option(
        "--layers", help="A layers artifact (from select-layers): train on its chosen layers.")
    ] = None,
    layer: Annotated[list[int] | None, typer.Option(
        "--layer", help="A block index to train on, instead of --layers (repeat: --layer 3 "
                        "--layer 5).")] = None,
    general: Annotated[str | None, typer.Option(help="Optional general text for the mix.")
                       ] = None,
    protect: Annotated[list[str] | None, typer.Option(
        "--protect", help="LANG=FILE of a language to keep (repeat: --protect ur=ur.jsonl "
                          "--protect pa=pa.jsonl): measured, never trained on; forget latents "
                          "must then be rare on each of them (monolinguality).")] = None,
    field: FieldOpt = "text",
    expansion: Annotated[int, typer.Option(help="Latents per hidden dimension.")] = 16,
    k: Annotated[int, typer.Option("--k", help="Active latents per token.")] = 32,
    arch: Annotated[str, typer.Option(help="topk, batchtopk or matryoshka.")] = "topk",
    tokens: Annotated[int, typer.Option(help="Training tokens per SAE.")] = 200_000,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default: 2e-4 at 16k "
                                                  "latents, scaled 1/sqrt(latents)).")] = None,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per optimisation step.")] = 2048,
    buffer_tokens: Annotated[int, typer.Option(help="Shuffle-buffer size in tokens.")] = 16_384,
    warmup_steps: Annotated[int, typer.Option(help="Learning-rate warm-up steps.")] = 50,
    max_length: Annotated[int, typer.Option(help="Tokens per text.")] = 128,
    batch_size: BatchSizeOpt = 8,
    max_samples: MaxSamplesOpt = None,
    holdout: Annotated[float, typer.Option(help="Share of each set held out for quality and "
                                                "features.")] = 0.1,
    max_heldout: Annotated[int, typer.Option(help="At most this many held-out texts per set.")
                           ] = 200,
    ablation: Annotated[str, typer.Option(help="CE-recovered baseline: zero or mean.")] = "zero",
    top_n_features: Annotated[int, typer.Option(help="Forget features reported per layer.")
                              ] = 20,
    grad_attribution: Annotated[bool, typer.Option(
        "--grad-attribution", help="Also score latents by activation x gradient of the "
                                   "forget log-prob.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Keep activation shards here and reuse them on the next run.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Checkpoint folder (default: .<out>.checkpoint beside --out).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint."
                                         )] = False,
    export_saelens: Annotated[Path | None, typer.Option(
        "--export-saelens", help="Also write the SAEs in SAELens' layout to this folder.")
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train TopK sparse autoencoders on the chosen layers and find forget-language features.

    Layers come from a select-layers artifact (--layers DIR) or are listed with --layer N.
    The artifact holds one SAE per layer, held-out quality (FVU, L0, dead latents, CE-loss
    recovered) and features.md / features.json with the top forget latents and their contexts.
    """
    from mmie.core.distributed import world
    from mmie.train_sae.export import export_saelens as export
    from mmie.train_sae.stage import TrainSaeConfig, run

    main = world().main  # under torchrun / accelerate launch only rank 0 writes and reports

    def body():
        config = TrainSaeConfig(
            forget=forget, retain=retain, general=general, protect=tuple(protect or ()),
            field=field,
            model=model_spec(model, device, dtype, device_map, blocks_path, max_memory),
            layers=tuple(layer or ()), layers_artifact=str(layers) if layers else None,
            expansion=expansion, k=k, arch=arch, tokens=tokens, lr=lr,
            batch_tokens=batch_tokens, buffer_tokens=buffer_tokens, warmup_steps=warmup_steps,
            max_length=max_length, batch_size=batch_size, max_samples=max_samples,
            holdout=holdout, max_heldout=max_heldout, ablation=ablation,
            top_n_features=top_n_features,
            grad_attribution=grad_attribution, cache_dir=str(cache_dir) if cache_dir else None,
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
            checkpoint_every=checkpoint_every, seed=seed)
        writes(config, out, force, resume, main)
        artifact = run(config, out, force=force, resume=resume, progress=progress())
        folders = export(artifact, export_saelens, force=force) if export_saelens and main else []
        return artifact, folders

    artifact, folders = run_guarded(body)
    if not main:
        return
    console.print(_table(artifact.metrics))
    _top_features(artifact)
    info(f"wrote {artifact.path}" + (f" and SAELens export {export_saelens}" if folders else ""))
    if json_out:
        emit_json({"artifact": str(artifact.path), "layers": artifact.metrics["layers"],
                   "selected": artifact.metrics["selected"],
                   "saelens": [str(f) for f in folders]})
