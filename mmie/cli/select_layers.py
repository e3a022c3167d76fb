"""`mmie select-layers`: per-layer forget-vs-retain metrics and the layers to work on."""

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
from mmie.cli.options import BatchSizeOpt, FieldOpt, MaxLengthOpt, MaxSamplesOpt, parse_pairs

METRIC_COLUMNS = (("probe_auc", "probe AUC"), ("debiased_cka", "dCKA"), ("linear_cka", "CKA"),
                  ("procrustes", "Procrustes"), ("anc", "ANC"))


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(metrics: dict) -> Table:
    chosen = set(metrics["chosen"])
    langs = metrics.get("lape", {}).get("languages", [])
    table = Table(title=f"select-layers ({metrics['strategy']['name']}, "
                        f"{'paired' if metrics['paired'] else 'unpaired'}, "
                        f"n={metrics['n_samples']})")
    for col in ("layer", *(label for _, label in METRIC_COLUMNS), "score", "rank",
                *(f"LAPE {lang}" for lang in langs)):
        table.add_column(col, justify="right")
    for row in metrics["layers"]:
        mark = "*" if row["layer"] in chosen else ("" if row["candidate"] else "x")
        table.add_row(f"{row['layer']}{mark}", *(_fmt(row[key]) for key, _ in METRIC_COLUMNS),
                      _fmt(row["score"]), str(row["rank"] or "—"),
                      *(str(row["lape"].get(lang, "—")) for lang in langs),
                      style="bold green" if row["layer"] in chosen else None)
    table.caption = "* chosen   x not a candidate (last block)   — missing"
    return table


def _missing_lines(metrics: dict) -> list[str]:
    by_reason: dict[tuple[str, str], list[int]] = {}
    for row in metrics["layers"]:
        for name, reason in row["missing"].items():
            by_reason.setdefault((name, reason), []).append(row["layer"])
    return [f"missing {name} on layers {', '.join(map(str, layers))}: {reason}"
            for (name, reason), layers in sorted(by_reason.items())]


@app.command("select-layers")
def select_layers_cmd(
    forget: Annotated[str, typer.Option(help="Texts of the language to forget.")],
    retain: Annotated[str, typer.Option(help="Texts of a language to keep.")],
    out: OutOpt,
    model: ModelOpt = "default",
    top_k: Annotated[int, typer.Option("--top-k", help="Layers to choose.")] = 3,
    strategy: Annotated[str, typer.Option(
        help="Layer-picking rule: probe-cka (z(probe AUC) - z(debiased CKA)), probe, cka, "
             "probe-procrustes.")] = "probe-cka",
    include_last: Annotated[bool, typer.Option(
        "--include-last", help="Also offer the last block (excluded by default).")] = False,
    max_samples: MaxSamplesOpt = None,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchSizeOpt = 8,
    folds: Annotated[int, typer.Option(help="Folds of the linear probe.")] = 5,
    pairing: Annotated[str, typer.Option(
        help="auto: forget/retain paired when they have as many records; yes; no.")] = "auto",
    lang: Annotated[list[str] | None, typer.Option(
        "--lang", help="NAME=FILE text set for counting language-specific neurons; repeat, "
                       "at least two (e.g. hi=hi.txt en=en.txt ur=ur.txt).")] = None,
    field: FieldOpt = "text",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Compare forget vs retain activations per layer and pick the layers to work on."""
    from mmie.core.provenance import refuse_same_texts
    from mmie.layers.stage import SelectLayersConfig, run

    langs = parse_pairs(lang, "--lang", "NAME=FILE")

    def body():
        config = SelectLayersConfig(
            forget=forget, retain=retain, field=field, langs=langs, top_k=top_k,
            strategy=strategy, include_last=include_last, max_samples=max_samples,
            max_length=max_length, batch_size=batch_size, folds=folds, seed=seed,
            pairing=pairing,
            model=model_spec(model, device, dtype, device_map, blocks_path, max_memory))
        refuse_same_texts(forget, [retain])
        return run(writes(config, Path(out), force), Path(out), force=force, progress=progress())

    artifact = run_guarded(body)
    metrics = artifact.metrics
    console.print(_table(metrics))
    for line in _missing_lines(metrics):
        info(f"[yellow]{line}[/]")
    for layer in metrics["chosen"]:
        info(f"layer {layer}: {metrics['reasons'][str(layer)]['text']}")
    info(f"chosen layers {metrics['chosen']}; artifact written to {artifact.path}")
    if json_out:
        emit_json({"artifact": str(artifact.path), "chosen": metrics["chosen"],
                   "reasons": metrics["reasons"], "layers": metrics["layers"],
                   "paired": metrics["paired"], "strategy": metrics["strategy"]})
