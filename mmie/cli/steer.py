"""`mmie steer`: does one steering direction bring the forget language back?"""

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
from mmie.cli.options import FieldOpt, MaxLengthOpt


def _cell(r: dict) -> str:
    return f"{r['x']}/{r['n']} [{r['low']:.2f}, {r['high']:.2f}]"


def _recovery(r: dict | None) -> str:
    if not r:
        return ""
    if r.get("value") is None:
        return r.get("missing", "—")
    ci = f" [{r['low']:.2f}, {r['high']:.2f}]" if "low" in r else ""
    return f"{r['value']:.2f}{ci}"


def _table(m: dict) -> Table:
    table = Table(title=f"{m['forget_lang']} rate of continuations, steered toward it")
    table.add_column("run (block x scale)")
    conds = [c for c in ("base", "arm") if c in m]
    for cond in conds:
        table.add_column(f"{cond} rate [95% CI]", justify="right")
    if "recovery" in m:
        table.add_column("arm recovery [CI]", justify="right")
    for key in m["base"]:
        cells = [_cell(m[cond][key]) for cond in conds]
        cells += [_recovery(m["recovery"].get(key))] if "recovery" in m else []
        table.add_row("unsteered" if key == "0" else key, *cells)
    return table


@app.command("steer")
def steer_cmd(
    forget_train: Annotated[str, typer.Option(
        "--forget-train", help="Forget-language training texts (the direction's one side).")],
    replacement_train: Annotated[str, typer.Option(
        "--replacement-train", help="Replacement-language training texts (e.g. English): the "
                                    "direction is mean(forget) - mean(replacement).")],
    prompts: Annotated[str, typer.Option(
        help="Held-out forget-language prompts to continue (never training texts).")],
    out: OutOpt,
    layer: Annotated[list[int], typer.Option(
        "--layer", help="Block whose output gets the direction (repeat for several).")],
    scale: Annotated[list[float] | None, typer.Option(
        "--scale", help="Multiple of the direction (repeat; default 1 and 2; 0, the "
                        "unsteered run, is always measured).")] = None,
    forget_lang: Annotated[str, typer.Option(help="Language ID label of the forget "
                                                  "language.")] = "hi",
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    sae: SaeOpt = None,
    gate_strength: GateStrengthOpt = None,
    script_scrub: ScrubOpt = None,
    neurons: NeuronsOpt = None,
    neuron_scale: NeuronScaleOpt = None,
    n_prompts: Annotated[int, typer.Option(help="Prompts continued.")] = 60,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per continuation.")] = 32,
    head_dtype: Annotated[str, typer.Option(
        "--head-dtype", help="LM-head matmul precision while generating: fp32 or bf16.")
    ] = "fp32",
    max_length: MaxLengthOpt = 128,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    field: FieldOpt = "text",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Steering recovery: add one difference-of-means direction (forget minus replacement
    language, from training texts) at a block and continue held-out forget prompts, on the base
    model and the arm; the forget-language rate per run and the arm's recovery fraction."""
    from mmie.depth.steering import SteerRunConfig, run

    def body():
        config = SteerRunConfig(
            forget_train=forget_train, replacement_train=replacement_train, prompts=prompts,
            layers=tuple(layer), scales=tuple(scale or (1.0, 2.0)), forget_lang=forget_lang,
            arm=arm_spec(adapter, sae, gate_strength, script_scrub, neurons, neuron_scale),
            model=model_spec(model, device, dtype), field=field, n_prompts=n_prompts,
            max_new_tokens=max_new_tokens, head_dtype=head_dtype, max_length=max_length,
            n_boot=n_boot, seed=seed)
        return run(config, Path(out), force=force, progress=progress())

    artifact = run_guarded(body)
    console.print(_table(artifact.metrics))
    info(f"arm {artifact.metrics['arm_name']}; artifact written to {artifact.path}")
    if json_out:
        emit_json({"artifact": str(artifact.path), **{k: artifact.metrics[k] for k in (
            "arm_name", "base", *(["arm", "recovery"] if "arm" in artifact.metrics else []))}})
