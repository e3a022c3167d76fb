"""`mmie report`: a self-contained HTML page from a run's artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmie.cli.app import app
from mmie.cli.common import info, run_guarded


@app.command("report")
def report_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Folders searched for artifacts.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path(
        "report.html"),
    title: Annotated[str, typer.Option(help="Page title.")] = "mmie report",
) -> None:
    """One HTML page (images inlined): layers, SAEs, training curves, metrics, heatmap, gates."""
    from mmie.report.stage import ReportConfig, run

    path = run_guarded(lambda: run(ReportConfig(tuple(map(str, inputs)), str(out), title)))
    info(f"report written to [bold]{path}[/]")
