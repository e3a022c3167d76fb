"""`mmie sweep`: a small grid of unlearning runs, chosen on validation, the winner tested once.

The orchestration lives in :mod:`mmie.sweep.stage`, which never imports another stage; this
command wires in `unlearn` (every run, with its validation split) and `evaluate` (the winner
only) through their public ``run`` functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmie.cli.app import app
from mmie.cli.common import (
    BlocksPathOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    console,
    emit_json,
    model_spec,
    progress,
    run_guarded,
)


def _pairs(value) -> tuple:
    """A TOML table ``{ur = "f"}`` or a list of pairs -> ((name, value), ...)."""
    items = value.items() if isinstance(value, dict) else value
    return tuple((str(k), v) for k, v in items)


def build(kind: type, settings: dict, table: str):
    """``kind(**settings)``, naming the grid file's table on an unknown key."""
    try:
        return kind(**settings)
    except TypeError as exc:
        raise ValueError(f"the grid file's '{table}' table: {exc}") from None


def unlearn_config(config, overrides: dict, spec):
    """One run's settings; ``[unlearn] alternative`` goes only to runs whose objective reads an
    alternative text (``redirect``, ``dpo``), ``gate_probe`` only to ``glora`` runs and
    ``neurons`` only to ``nrows`` runs: the others refuse them."""
    from mmie.unlearn.config import alternative_objectives
    from mmie.unlearn.stage import UnlearnConfig

    settings = {**config.unlearn, **overrides, "model": spec, "validation": config.validation}
    if settings.get("objective", "npo") not in alternative_objectives():
        settings.pop("alternative", None)
    if settings.get("method", "lora") != "glora":
        settings.pop("gate_probe", None)
    if settings.get("method", "lora") != "nrows":
        settings.pop("neurons", None)
    for key in ("objective_options", "retain_options", "retain_weights"):
        settings[key] = _pairs(settings.get(key, ()))
    return build(UnlearnConfig, settings, "unlearn")


def eval_config(config, adapter: Path, spec):
    from mmie.evaluate.config import EvalConfig

    settings = {**config.test, "model": spec, "adapter": str(adapter)}
    settings["xlang"] = _pairs(settings.get("xlang", ()))
    return build(EvalConfig, settings, "test")


def _table(artifact) -> Table:
    table = Table(title=f"mmie sweep: winner {artifact.metrics['winner']}")
    for column in ("run", "kept step", "met rule", "val forget mass", "val ppl ratio",
                   "min retention"):
        table.add_column(column)
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for r in artifact.metrics["runs"]:
        table.add_row(r["run"], str(r["chosen_step"]), "yes" if r["qualified"] else "no",
                      fmt(r["forget_mass"]), fmt(r["retain_ppl_ratio"]), fmt(r["min_retention"]))
    return table


@app.command("sweep")
def sweep_cmd(
    grid: Annotated[Path, typer.Argument(help="Grid file (TOML: [unlearn], [validation], "
                                              "[test], [grid]; see configs/sweep.toml).")],
    out: OutOpt,
    model: ModelOpt = "default",
    axis: Annotated[list[str] | None, typer.Option(
        "--axis", help="NAME=V1,V2: replace a grid axis (method, objective, lr, rank, steps); "
                       "repeat.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train every run of a small grid with its validation split, pick the winner on
    validation only, evaluate only the winner on the test split (once), and write a 'sweep'
    artifact with every run's validation scores. Runs go to OUT.runs/."""
    from mmie.evaluate.stage import run as evaluate_run
    from mmie.sweep.grid import load_grid
    from mmie.sweep.stage import run as sweep_run
    from mmie.unlearn.stage import run as unlearn_run

    def body():
        config = load_grid(grid, axis or [])
        spec = model_spec(model, device, dtype, None, blocks_path)
        return sweep_run(
            config, out, force=force, progress=progress(),
            train=lambda o, path: unlearn_run(unlearn_config(config, o, spec), path,
                                              force=force, progress=progress()).path,
            evaluate=lambda a, path: evaluate_run(eval_config(config, a, spec), path,
                                                  force=force, progress=progress()).path)

    artifact = run_guarded(body)
    if json_out:
        emit_json({"path": str(artifact.path), "winner": artifact.metrics["winner"],
                   "runs": artifact.metrics["runs"], "test": artifact.metrics["test"]})
    else:
        console.print(_table(artifact))
