"""`mmie data check`: inspect text files before a run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mmie.cli.app import data_app
from mmie.cli.common import JsonOpt, emit_json, fail, out, run_guarded
from mmie.cli.options import FieldOpt


def _table(report: dict) -> Table:
    table = Table(title="data check")
    for col in ("file", "texts", "empty", "dupes", "scripts", "languages", "tokens", "trunc"):
        table.add_column(col)
    for f in report["files"]:
        top = lambda d: ", ".join(f"{k} {v:.0%}" for k, v in list(d.items())[:3])  # noqa: E731
        table.add_row(f["file"], str(f["texts"]), str(f["empty"]), str(f["duplicates"]),
                      top(f.get("scripts", {})), top(f.get("languages", {})),
                      str(f.get("tokens_mean", "-")), str(f.get("truncated_share", "-")))
    return table


@data_app.command("check")
def check(
    files: Annotated[list[str], typer.Argument(help="Text files (.jsonl, .txt, .tsv, .csv).")],
    field: FieldOpt = "text",
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Report token lengths with this model's tokenizer.")] = None,
    max_length: Annotated[int, typer.Option(help="Token budget for the truncation share.")] = 128,
    lid: Annotated[bool, typer.Option(help="Run language ID over the texts.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Counts, empty and duplicate lines, script and language mix, token lengths, overlaps."""
    from mmie.datacheck.check import CheckConfig, problems, run

    report = run_guarded(lambda: run(CheckConfig(tuple(files), field, model, max_length, lid)))
    if json_out:
        emit_json(report)
    else:
        out.print(_table(report))
        for pair in report["overlap"]:
            if pair["shared"]:
                out.print(f"[yellow]overlap:[/] {pair['shared']} texts in both {pair['a']} "
                          f"and {pair['b']}")
    if found := problems(report):  # the report is shown first, then the refusal
        raise fail("; ".join(found), 1)
