"""`mmie gate`: one-sided bounds per gate and a PROCEED/STOP decision per arm over seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmie.cli.app import app
from mmie.cli.common import (
    ForceOpt,
    JsonOpt,
    OutOpt,
    SeedOpt,
    console,
    emit_json,
    info,
    progress,
    run_guarded,
)
from mmie.core.errors import MmieError

_STYLES = {"PASS": "green", "FAIL": "red", "REPORT": "dim", "NOT INFORMATIVE": "dim",
           "PROCEED": "bold green", "STOP": "bold red"}


def _styled(decision: str) -> str:
    return f"[{_STYLES[decision]}]{decision}[/]"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(report: dict) -> Table:
    from mmie.gate.render import threshold_text

    table = Table(title="mmie gate")
    for column in ("arm", "gate", "estimate", "interval", "threshold", "n", "min n", "decision"):
        table.add_column(column)
    for g in report["gates"]:
        ci = "-" if g["ci"] is None else f"[{g['ci']['low']:.4g}, {g['ci']['high']:.4g}]"
        table.add_row(g["arm"], g["gate"], _fmt(g["estimate"]), ci, threshold_text(g),
                      _fmt(g["n"]), _fmt(g["min_n"]), _styled(g["decision"]))
    table.add_section()
    for arm, verdict in report["arms"].items():
        table.add_row(arm, "[bold]all decisive gates[/]", "", "", "", "", "",
                      _styled(verdict["decision"]))
    return table


def _notes(report: dict) -> list[str]:
    """Lines under the table: insufficient and not-informative gates, said in words."""
    out = []
    for arm, verdict in report["arms"].items():
        if verdict["insufficient"]:
            out.append(f"{arm}: insufficient evidence (too few samples to pass at this alpha, "
                       f"see 'min n'): {', '.join(verdict['insufficient'])}")
        if verdict["not_informative"]:
            out.append(f"{arm}: not informative, shown but not decisive (the baseline's own "
                       f"rate is below the floor): {', '.join(verdict['not_informative'])}")
    return out


@app.command("gate")
def gate_cmd(
    baseline: Annotated[Path, typer.Option(
        "--baseline", help="Eval artifact of the model before unlearning.")],
    evals: Annotated[list[Path], typer.Option(
        "--eval", help="Eval artifact of one arm and seed; repeat it, or list several after "
                       "one --eval.")],
    out: OutOpt,
    more_evals: Annotated[list[Path] | None, typer.Argument(
        metavar="EVAL", help="More eval artifacts (so that '--eval a b c' works).",
        show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML thresholds overriding the shipped mmie/gates.toml.")] = None,
    alpha: Annotated[float, typer.Option(
        help="Level of each one-sided gate test (bands: TOST); the verdict's error rate is at "
             "most alpha too.")] = 0.05,
    replacement_lang: Annotated[str, typer.Option(
        help="Language forget prompts should be answered in instead (the replacement "
             "gate).")] = "en",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples per interval.")] = 10000,
    seed: SeedOpt = 0,
    relearn: Annotated[list[Path] | None, typer.Option(
        "--relearn", help="A `mmie relearn` artifact of a gated arm (tied to it by its recorded "
                          "arm name); adds the relearn_recovery gate. Repeat per arm.")] = None,
    comprehension: Annotated[list[Path] | None, typer.Option(
        "--comprehension", help="A `mmie comprehension` artifact of a gated arm; adds the "
                                "retrieval_ratio gate. Repeat per arm.")] = None,
    relearn_step: Annotated[int, typer.Option(
        help="Attack steps after which relearn_recovery is judged (in the schedule).")] = 20,
    relearn_metric: Annotated[str, typer.Option(
        help="Recovery of 'nll' or 'script_mass' on held-out forget texts.")] = "nll",
    retrieval_block: Annotated[int | None, typer.Option(
        help="Block of retrieval_ratio (default: where the base model retrieves the forget "
             "language best).", show_default=False)] = None,
    stop_exit_code: Annotated[int | None, typer.Option(
        help="Exit with this code when some arm is STOP (default: exit 0 either way).")] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Exact and BCa bounds per gate, PROCEED/STOP per arm over seeds (docs/gates.md)."""
    from mmie.gate.depth import DepthSettings
    from mmie.gate.stage import STOP, GateConfig, run

    def body():
        if config is not None and not config.is_file():
            raise MmieError(f"--config {config}: no such file (a TOML file of gate thresholds)")
        depth = DepthSettings(relearn_step, relearn_metric, retrieval_block)
        settings = GateConfig.from_toml(config, alpha=alpha, n_boot=n_boot, seed=seed,
                                        replacement_lang=replacement_lang, depth=depth)
        return run(settings, baseline, [*evals, *(more_evals or [])], out, force=force,
                   progress=progress(), relearn=relearn or [],
                   comprehension=comprehension or [])

    artifact = run_guarded(body)
    report = json.loads(artifact.read_text("gate.json"))
    console.print(_table(report))
    for line in _notes(report):
        info(line)
    info(f"wrote {artifact.path}")
    decisions = {arm: verdict["decision"] for arm, verdict in report["arms"].items()}
    if json_out:
        emit_json({"artifact": str(artifact.path), "arms": decisions,
                   "gates": report["gates"], "rule": report["rule"]})
    if stop_exit_code is not None and STOP in decisions.values():
        raise typer.Exit(stop_exit_code)
