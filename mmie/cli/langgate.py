"""`mmie langgate`: fit the language gate that `unlearn --method glora` conditions its edit on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmie.cli.app import app
from mmie.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    emit_json,
    info,
    model_spec,
    progress,
    run_guarded,
)
from mmie.cli.options import BatchSizeOpt, FieldOpt, MaxLengthOpt

SetsOpt = list[str] | None


def _sets(items: SetsOpt, option: str) -> dict[str, str]:
    """``NAME=FILE`` or ``FILE`` (named by its stem) -> {name: path}."""
    sets = {}
    for item in items or []:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
        if name in sets:
            raise typer.BadParameter(f"{option}: set name '{name}' given twice")
        sets[name] = path
    return sets


@app.command("langgate")
def langgate(
    positive: Annotated[SetsOpt, typer.Option(
        "--positive", help="[NAME=]FILE of the forget language (train split); repeat, e.g. "
                           "hi and romanized hi.")] = None,
    negative: Annotated[SetsOpt, typer.Option(
        "--negative", help="[NAME=]FILE of a language to keep (train split); repeat.")] = None,
    val_positive: Annotated[SetsOpt, typer.Option(
        "--val-positive", help="[NAME=]FILE: validation texts of the forget language (they "
                               "set the threshold; never training texts).")] = None,
    val_negative: Annotated[SetsOpt, typer.Option(
        "--val-negative", help="[NAME=]FILE: validation texts of a language to keep.")] = None,
    out_dir: OutOpt = Path("runs/langgate"),
    layer: Annotated[list[int] | None, typer.Option(
        "--layer", help="Candidate block whose output the probe reads (repeat; default 4, 6, "
                        "8); a gated edit acts on the blocks after the chosen one.")] = None,
    window: Annotated[list[int] | None, typer.Option(
        "--window", help="Candidate number of tokens averaged before the threshold (repeat; "
                         "default 3, 5).")] = None,
    l2: Annotated[float, typer.Option(help="Ridge penalty on the probe weights.")] = 1e-3,
    val_prompt_frac: Annotated[float | None, typer.Option(
        "--val-prompt-frac", help="Score each validation positive text on its prompt only (its "
                                  "first share of words, as evaluate cuts it, e.g. 0.5): the "
                                  "gate must fire before the answer starts.")] = None,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchSizeOpt = 16,
    field: FieldOpt = "text",
    model: ModelOpt = "default",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit a language gate: a logistic probe on one block's output, token by token, and a
    threshold chosen on validation texts (the layer and window too, by the widest validation
    margin); a 'langgate' artifact for unlearn --method glora.

    The gate fires on a sequence from the first window of tokens whose mean score exceeds the
    threshold; an edit behind it leaves every sequence it does not fire on exactly as the base
    model has it. The artifact records the share of each validation set that fires.
    """
    from mmie.edits.langgate import LangGateConfig, run

    def body():
        config = LangGateConfig(layers=tuple(layer or (4, 6, 8)),
                                windows=tuple(window or (3, 5)), l2=l2, max_length=max_length,
                                batch_size=batch_size, val_prompt_frac=val_prompt_frac)
        inputs = {"positive": _sets(positive, "--positive"),
                  "negative": _sets(negative, "--negative"),
                  "val_positive": _sets(val_positive, "--val-positive"),
                  "val_negative": _sets(val_negative, "--val-negative")}
        return run(model_spec(model, device, dtype), inputs, out_dir, config, field=field,
                   force=force, progress=progress())

    artifact = run_guarded(body)
    m = artifact.metrics
    if json_out:
        emit_json({"out": str(artifact.path), **m})
        return
    fired = "; ".join(f"{name} {share:.0%}" for cls in ("pos", "neg")
                      for name, share in m["val_fired"][cls].items())
    tried = ", ".join(f"{c['layer']}/{c['window']}: {c['margin']:.3g}" for c in m["candidates"])
    info(f"layer {m['layer']}, window {m['window']}, threshold {m['threshold']:.3g} "
         f"(validation margin {m['margin']:.3g}, "
         f"{'separable' if m['separable'] else 'NOT separable'}; margins by layer/window: "
         f"{tried}); validation texts that fire: {fired} -> {artifact.path}")
