"""`mmie comprehension`: parallel-sentence retrieval and a forget-language probe per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmie.cli.app import app
from mmie.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    SeedOpt,
    console,
    emit_json,
    info,
    model_spec,
    progress,
    run_guarded,
)
from mmie.cli.depth_options import (
    AdapterOpt,
    GateStrengthOpt,
    NeuronScaleOpt,
    NeuronsOpt,
    SaeOpt,
    ScrubOpt,
    arm_spec,
)
from mmie.cli.options import (
    BatchSizeOpt,
    FieldOpt,
    LayersOpt,
    MaxLengthOpt,
    MaxSamplesOpt,
    parse_layers,
    parse_pairs,
)


def _table(metrics: dict, lang: str) -> Table:
    conds = [c for c in ("base", "arm") if c in metrics]
    probe = f"; probe AUC of {lang} vs the rest" if lang == metrics["forget"] else " (control)"
    table = Table(title=f"{lang} -> {metrics['pivot']} retrieval top-1 / MRR (n={metrics['n']}, "
                        f"chance {1 / metrics['n']:.3f}){probe}")
    table.add_column("block", justify="right")
    for cond in conds:
        table.add_column(f"{cond} top-1 [CI]", justify="right")
        table.add_column(f"{cond} MRR", justify="right")
        if lang == metrics["forget"]:
            table.add_column(f"{cond} probe", justify="right")
    for layer in metrics["layers"]:
        cells = []
        for cond in conds:
            r = metrics[cond]["retrieval"][lang][str(layer)]
            ci = f" [{r['top1_low']:.2f}, {r['top1_high']:.2f}]" if "top1_low" in r else ""
            cells += [f"{r['top1']:.3f}{ci}", f"{r['mrr']:.3f}"]
            if lang == metrics["forget"]:
                p = metrics[cond]["probe"][str(layer)]["value"]
                cells.append("—" if p is None else f"{p:.3f}")
        table.add_row(str(layer), *cells)
    return table


@app.command("comprehension")
def comprehension_cmd(
    pivot: Annotated[str, typer.Option(help="Pivot-language file (English), line-aligned with "
                                            "every --pair file.")],
    pair: Annotated[list[str], typer.Option(
        "--pair", help="NAME=FILE of a language aligned with --pivot; repeat (the forget "
                       "language and controls, e.g. hi=hi.txt ur=ur.txt bn=bn.txt).")],
    out: OutOpt,
    forget: Annotated[str, typer.Option(help="Which --pair is the forget language.")] = "hi",
    pivot_name: Annotated[str, typer.Option(help="Name of the pivot language.")] = "en",
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    sae: SaeOpt = None,
    gate_strength: GateStrengthOpt = None,
    script_scrub: ScrubOpt = None,
    neurons: NeuronsOpt = None,
    neuron_scale: NeuronScaleOpt = None,
    layers: LayersOpt = None,
    max_samples: MaxSamplesOpt = None,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchSizeOpt = 8,
    folds: Annotated[int, typer.Option(help="Folds of the forget-language probe.")] = 5,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    field: FieldOpt = "text",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Does the model still understand the forget language? Parallel-sentence retrieval
    (top-1, MRR) against the pivot and a forget-language probe per block, base and arm."""
    from mmie.depth.comprehension import ComprehensionConfig, run

    pairs = parse_pairs(pair, "--pair", "NAME=FILE")
    chosen = parse_layers(layers)

    def body():
        config = ComprehensionConfig(
            pivot=pivot, langs=pairs, forget=forget, pivot_name=pivot_name, field=field,
            arm=arm_spec(adapter, sae, gate_strength, script_scrub, neurons, neuron_scale),
            layers=chosen, max_samples=max_samples, max_length=max_length,
            batch_size=batch_size, folds=folds, seed=seed, n_boot=n_boot,
            model=model_spec(model, device, dtype))
        return run(config, Path(out), force=force, progress=progress())

    artifact = run_guarded(body)
    metrics = artifact.metrics
    for name, _ in pairs:
        console.print(_table(metrics, name))
    info(f"arm {metrics['arm_name']}; artifact written to {artifact.path}")
    if json_out:
        emit_json({"artifact": str(artifact.path), **{k: metrics[k] for k in (
            "layers", "n", "arm_name", "base", *(["arm", "change_top1"] if "change_top1" in metrics
                                            else []))}})
