"""`mmie data check` and `mmie data continue`: inspect text files, or make retain texts from
a model's own continuations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmie.cli.app import data_app
from mmie.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    emit_json,
    fail,
    info,
    model_spec,
    out,
    progress,
    run_guarded,
)
from mmie.cli.options import FieldOpt
from mmie.core.generation import EVAL_REPETITION_PENALTY


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


@data_app.command("continue")
def continue_(
    files: Annotated[list[str], typer.Argument(
        help="Text files whose texts are cut into prompts (several: one model load).")],
    langs: Annotated[list[str], typer.Option(
        "--lang", help="Keep continuations in this language (a LID label, e.g. bn); once, or "
                       "once per file in order.")],
    out_paths: Annotated[list[Path], typer.Option(
        "--out", "-o", help="jsonl file to write, once per file in order; what made it goes "
                            "to <out>.json.")],
    model: ModelOpt = "default",
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 48,
    repetition_penalty: Annotated[float, typer.Option(
        help="CTRL-style repetition penalty, as evaluate generates (1.0 = off)."),
    ] = EVAL_REPETITION_PENALTY,
    head_dtype: Annotated[str, typer.Option(
        "--head-dtype", help="LM-head matmul precision while generating: fp32 or bf16 "
                             "(greedy continuations are the fp32 ones).")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 64,
    max_samples: Annotated[int | None, typer.Option(
        help="Continue only the first N texts.")] = None,
    field: FieldOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace --out and its sidecar.")] = False,
    keep_all: Annotated[bool, typer.Option(
        "--keep-all", help="Keep every continuation, whatever its language (smoke runs on "
                           "tiny random models).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Retain texts on the model's own continuations: prompt + greedy continuation, kept when
    the continuation is in --lang and not degenerate; pass the output as unlearn --retain.

    Single-sentence retain texts never show the retain loss what the model writes after a
    sentence ends: a redirect-trained LoRA kept Bengali's teacher-forced mass but switched
    Bengali answers to English there. KL to the frozen model on the base model's own
    continuations of protected-language prompts puts those positions under the retain loss
    (default model: Bengali answers kept 52 of 57, was 28 of 57; Punjabi 54 of 58).
    Several files are continued one after the other with the model loaded once, each exactly
    as a call of its own would.
    """
    from mmie.datacheck.continuations import ContinueConfig, run_many

    if len(langs) not in (1, len(files)) or len(out_paths) != len(files):
        raise fail(f"{len(files)} file(s): give --out once per file ({len(out_paths)} given) "
                   f"and --lang once or once per file ({len(langs)} given)", 2)

    def body() -> list[dict]:
        spec = model_spec(model, device, dtype)
        configs = [ContinueConfig(f, lg, spec, max_new_tokens=max_new_tokens,
                                  repetition_penalty=repetition_penalty, head_dtype=head_dtype,
                                  batch_size=batch_size, max_samples=max_samples, field=field,
                                  keep_all=keep_all)
                   for f, lg in zip(files, langs * len(files) if len(langs) == 1 else langs,
                                    strict=True)]
        return run_many(list(zip(configs, out_paths, strict=True)), force=force,
                        progress=progress())

    reports = run_guarded(body)
    if json_out:  # one file: its report, as before; several: the list
        emit_json(reports[0] if len(reports) == 1 else reports)
        return
    for report, out_path in zip(reports, out_paths, strict=True):
        counts = report["counts"]
        dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items())
        info(f"kept {counts['kept']} of {counts['in']} ({dropped} dropped) -> {out_path}")
