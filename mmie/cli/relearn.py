"""`mmie relearn`: a cheap fine-tuning attack on an arm and on the base model; recovery."""

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
from mmie.cli.options import FieldOpt, MaxLengthOpt, parse_layers, parse_pairs


def _cell(cell: dict) -> str:
    if cell.get("value") is None:
        return "—"
    ci = f" [{cell['low']:.2f}, {cell['high']:.2f}]" if "low" in cell else ""
    return f"{cell['value']:.3f}{ci}"


def _table(m: dict) -> Table:
    table = Table(title=f"relearn: {m['arm_name']} vs base (held-out forget texts)")
    table.add_column("step", justify="right")
    for name in m["metrics"]:
        table.add_column(f"{name} arm", justify="right")
        table.add_column(f"{name} base", justify="right")
        table.add_column(f"recovery ({name}) [CI]", justify="right")
    for step in map(str, m["steps"]):
        cells = []
        for name in m["metrics"]:
            cells += [f"{m['curves']['arm'][name][step]:.3f}",
                      f"{m['curves']['base'][name][step]:.3f}",
                      _cell(m["recovery"][name][step])]
        table.add_row(step, *cells)
    return table


@app.command("relearn")
def relearn_cmd(
    attack: Annotated[str, typer.Option(
        help="Forget-language texts the attacker fine-tunes on (disjoint from every "
             "evaluation text; checked by hash).")],
    heldout: Annotated[str, typer.Option(help="Held-out forget-language texts to score.")],
    out: OutOpt,
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    sae: SaeOpt = None,
    gate_strength: GateStrengthOpt = None,
    script_scrub: ScrubOpt = None,
    neurons: NeuronsOpt = None,
    neuron_scale: NeuronScaleOpt = None,
    control: Annotated[list[str] | None, typer.Option(
        "--control", help="NAME=FILE of a set scored as a control (e.g. ur=ur.txt); "
                          "repeat.")] = None,
    eval_texts: Annotated[list[str] | None, typer.Option(
        "--eval-texts", help="Further evaluation file the attack set must not overlap; "
                             "repeat.")] = None,
    steps: Annotated[str, typer.Option(
        help="Checkpoints (attack steps) to measure at; 0 is always measured.")] = "0,5,10,20,50",
    rank: Annotated[int, typer.Option(help="Attack LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="Attack LoRA alpha.")] = 16.0,
    lr: Annotated[float, typer.Option(help="Attack learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Attack texts per step (and per scoring "
                                                 "pass).")] = 8,
    max_attack: Annotated[int | None, typer.Option(help="Use the first N attack texts.")] = 50,
    max_heldout: Annotated[int | None, typer.Option(
        help="Score the first N held-out (and control) texts.")] = None,
    forget_script: Annotated[str, typer.Option(
        help="Script whose next-token mass is measured (Deva, Arab, Beng, Guru, Latn).")
    ] = "Deva",
    max_length: MaxLengthOpt = 128,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    field: FieldOpt = "text",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Relearning attack: fine-tune a LoRA on a few forget-language texts on top of the arm
    (and on the base model), score held-out forget texts at each checkpoint, and report the
    recovery fraction. Inference-time parts of the arm stay applied during the attack."""
    from mmie.depth.attack import AttackSpec
    from mmie.depth.relearn import RelearnConfig, run

    controls = parse_pairs(control, "--control", "NAME=FILE")
    schedule = parse_layers(steps, "--steps")

    def body():
        spec = AttackSpec(steps=schedule, rank=rank, alpha=alpha, lr=lr, batch_size=batch_size,
                          max_length=max_length, seed=seed)
        config = RelearnConfig(
            attack=attack, heldout=heldout, controls=controls, eval_texts=tuple(eval_texts or ()),
            arm=arm_spec(adapter, sae, gate_strength, script_scrub, neurons, neuron_scale),
            spec=spec, field=field, max_attack=max_attack, max_heldout=max_heldout,
            forget_script=forget_script, batch_size=batch_size, n_boot=n_boot,
            model=model_spec(model, device, dtype))
        return run(config, Path(out), force=force, progress=progress())

    artifact = run_guarded(body)
    m = artifact.metrics
    console.print(_table(m))
    reasons = {**m["missing"], **{f"recovery ({name})": cell["missing"]
                                  for name, cells in m["recovery"].items()
                                  for cell in cells.values() if "missing" in cell}}
    for name, reason in reasons.items():
        info(f"[yellow]missing {name}: {reason}[/]")
    if m["kept_during_attack"]:
        info(f"kept applied during the attack: {', '.join(m['kept_during_attack'])}")
    info(f"artifact written to {artifact.path}")
    if json_out:
        emit_json({"artifact": str(artifact.path), **{k: m[k] for k in (
            "steps", "curves", "recovery", "controls", "arm_name", "kept_during_attack")}})
