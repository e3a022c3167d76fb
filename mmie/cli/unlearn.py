"""`mmie unlearn`: train LoRA or ReFT edits that forget one language and keep the others."""

from __future__ import annotations

import warnings
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
from mmie.cli.options import FieldOpt, MaxLengthOpt, MaxSamplesOpt, parse_pairs
from mmie.core.distributed import world


def _weights(items: list[str] | None) -> tuple[tuple[str, float], ...]:
    try:
        return tuple((name, float(value)) for name, value in parse_pairs(items, "--retain-weight"))
    except ValueError as exc:
        raise typer.BadParameter(f"--retain-weight: {exc}") from None


def _modules(items: list[str] | None) -> tuple[str, ...] | None:
    names = [n.strip() for item in items or [] for n in item.split(",") if n.strip()]
    return tuple(names) or None


def validation_config(forget: str | None, retain: str | None, protect: list[str] | None,
                      every: int, fallback: str):
    """The --val-* options as a ValidationConfig (None when none is given)."""
    from mmie.unlearn.validation import ValidationConfig

    if forget is None and retain is None and not protect:
        return None
    return ValidationConfig(forget=forget or "", retain=retain or "",
                            protect=parse_pairs(protect, "--val-protect", "LANG=FILE"),
                            every=every, fallback=fallback)


def describe(artifact) -> dict:
    """A short summary of an ``adapter`` (or ``scrub``) artifact."""
    curve = artifact.metrics.get("curve") or [{}]
    return {"path": str(artifact.path), "kind": artifact.kind,
            "seed": artifact.config.get("seed"), "method": artifact.config.get("method"),
            "objective": artifact.config.get("objective"),
            "steps": len(artifact.metrics.get("curve", [])),
            "first_loss": curve[0].get("loss"), "final_loss": curve[-1].get("loss"),
            "seconds_per_step": artifact.metrics.get("seconds_per_step"),
            "chosen_step": (artifact.metrics.get("validation") or {}).get("chosen_step")}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(summaries: list[dict]) -> Table:
    table = Table(title="mmie unlearn")
    for column in ("artifact", "kind", "seed", "steps", "first loss", "final loss", "s/step",
                   "kept step"):
        table.add_column(column)
    for s in summaries:
        kept = s.get("chosen_step")
        table.add_row(s["path"], s["kind"], str(s.get("seed")), str(s.get("steps", "-")),
                      _fmt(s.get("first_loss")), _fmt(s.get("final_loss")),
                      _fmt(s.get("seconds_per_step")), "last" if kept is None else str(kept))
    return table


@app.command("unlearn")
def unlearn_cmd(
    forget: Annotated[str, typer.Option("--forget", help="Texts of the language to forget.")],
    retain: Annotated[list[str], typer.Option(
        "--retain", help="Texts of a language to keep; repeat for several sets.")],
    out: OutOpt,
    model: ModelOpt = "default",
    method: Annotated[str, typer.Option(
        help="lora (PEFT), reft (block-output interventions), glora (LoRA behind a language "
             "gate, --gate-probe), nrows (deltas on selected MLP neurons only, --neurons), or "
             "scrub (no training: fit a forget-vs-retain direction per "
             "layer, a 'scrub' artifact).")] = "lora",
    objective: Annotated[str, typer.Option(
        help="ga, graddiff, npo, simnpo, rmu, redirect or dpo.")] = "npo",
    alternative: Annotated[str | None, typer.Option(
        "--alternative", help="redirect / dpo: texts line-aligned with --forget, what each "
                              "forget prompt should be continued with instead (default: the "
                              "first --retain set's texts).")] = None,
    objective_opt: Annotated[list[str] | None, typer.Option(
        "--objective-opt", help="Objective setting NAME=VALUE, e.g. beta=0.2 (npo/simnpo), "
                                "steering_coeff=20 or layer=6 (rmu); repeat.")] = None,
    retain_loss: Annotated[str, typer.Option(
        help="kl (to the frozen model, top-k approximation) or nll.")] = "kl",
    retain_opt: Annotated[list[str] | None, typer.Option(
        "--retain-opt", help="Retain-loss setting NAME=VALUE, e.g. top_k=128 or exact=true.")
    ] = None,
    retain_weight: Annotated[list[str] | None, typer.Option(
        "--retain-weight", help="SET=W: weight of a retain set, named by its path or file stem "
                                "(en for data/en.jsonl); unnamed sets weigh 1; normalised.")
    ] = None,
    layers: Annotated[Path | None, typer.Option(
        "--layers", help="A layers artifact: edit its chosen blocks (default: every block for "
                         "LoRA, the middle three for ReFT and scrub).")] = None,
    seed: Annotated[list[int] | None, typer.Option(
        "--seed", help="Random seed; repeat for one artifact per seed under OUT/seed{N}.")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 30,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate (default 5e-4 for LoRA, 2e-3 for ReFT).")] = None,
    batch_size: Annotated[int, typer.Option(
        help="Texts per forget (and retain) batch; under a launcher the global batch, split "
             "evenly over the processes.")] = 4,
    max_length: MaxLengthOpt = 64,
    rank: Annotated[int | None, typer.Option(help="LoRA / ReFT rank (default 8 / 4).")] = None,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 16.0,
    target_modules: Annotated[list[str] | None, typer.Option(
        "--target-modules", help="LoRA target linears, comma-separated or repeated (default: "
                                 "q,k,v,o,gate,up,down_proj).")] = None,
    gate: Annotated[str | None, typer.Option(help="ReFT gate: grun.")] = None,
    gate_probe: Annotated[Path | None, typer.Option(
        "--gate-probe", help="--method glora: a langgate artifact (`mmie langgate`); the edit "
                             "acts only from where its gate fires, on the blocks after the "
                             "gate's block.")] = None,
    neurons: Annotated[Path | None, typer.Option(
        "--neurons", help="--method nrows: a neurons mask artifact (`mmie neurons select`, "
                          "e.g. --lape --exclusive); only those neurons' weights change.")
    ] = None,
    gate_weight: Annotated[float, typer.Option(help="Weight of the gate loss.")] = 1.0,
    reft_kind: Annotated[str, typer.Option(help="ReFT intervention: lowrank or loreft.")
                         ] = "lowrank",
    curriculum: Annotated[bool, typer.Option(
        "--curriculum", help="Visit forget texts easiest first (lowest base-model total NLL).")
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: none).")
                                ] = 10,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from .<out>.checkpoint; skip seeds already complete.")
    ] = False,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping (global L2 norm).")
                             ] = 1.0,
    max_samples: MaxSamplesOpt = None,
    field: FieldOpt = "text",
    scrub_whiten: Annotated[bool, typer.Option(
        "--scrub-whiten", help="--method scrub: LEACE-style whitened eraser.")] = False,
    val_forget: Annotated[str | None, typer.Option(
        "--val-forget", help="Held-out forget-language texts: with --val-retain, score the "
                             "edit every --val-every steps and save the checkpoint the "
                             "validation rule picks (README: validation-chosen checkpoints).")
    ] = None,
    val_retain: Annotated[str | None, typer.Option(
        "--val-retain", help="Held-out retain texts whose perplexity ratio must stay <= 1.05.")
    ] = None,
    val_protect: Annotated[list[str] | None, typer.Option(
        "--val-protect", help="LANG=FILE held-out texts of a protected language (must keep "
                              ">= 0.90 of its step-0 own-language mass); repeat.")] = None,
    val_every: Annotated[int, typer.Option(help="Steps between validations.")] = 10,
    val_fallback: Annotated[str, typer.Option(
        help="Adapter kept when no checkpoint meets the rule: last or step0.")] = "last",
    head_dtype: Annotated[str, typer.Option(
        "--head-dtype", help="LM-head matmul precision in the losses: fp32 or bf16 (about 3x "
                             "faster on CPUs with AVX-512 BF16; large logits and sums stay "
                             "fp32).")] = "fp32",
    retain_pack: Annotated[int, typer.Option(
        "--retain-pack", help="Join each run of N consecutive retain (and --val-protect) texts "
                              "with a newline, so the retain loss sees what follows a "
                              "sentence's end (1: as given).")] = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train LoRA or ReFT edits that forget the forget language and keep the retain ones.

    Each seed writes an 'adapter' artifact (OUT, or OUT/seed{N} with several seeds) holding
    the adapter weights, every setting, the base model's identity and the training curve.
    Data-parallel under torchrun / accelerate launch: --batch-size is the global batch, split
    evenly over the processes; only rank 0 prints and writes.
    """
    from mmie.edits.adapters import LORA_TARGETS
    from mmie.unlearn.stage import UnlearnConfig, run_seeds

    def body():
        config = UnlearnConfig(
            forget=forget, retain=tuple(retain), field=field,
            model=model_spec(model, device, dtype, None, blocks_path), method=method,
            objective=objective, objective_options=parse_pairs(objective_opt, "--objective-opt"),
            retain_loss=retain_loss, retain_options=parse_pairs(retain_opt, "--retain-opt"),
            retain_weights=_weights(retain_weight), layers=str(layers) if layers else None,
            steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, rank=rank,
            alpha=alpha, target_modules=_modules(target_modules) or LORA_TARGETS, gate=gate,
            gate_weight=gate_weight, reft_kind=reft_kind, curriculum=curriculum,
            checkpoint_every=checkpoint_every, max_grad_norm=max_grad_norm,
            max_samples=max_samples, scrub_whiten=scrub_whiten, alternative=alternative,
            validation=validation_config(val_forget, val_retain, val_protect, val_every,
                                         val_fallback),
            head_dtype=head_dtype, retain_pack=retain_pack,
            gate_probe=str(gate_probe) if gate_probe else None,
            neurons=str(neurons) if neurons else None)
        return run_seeds(config, seed or [0], out, force=force, resume=resume,
                         progress=progress())

    here = world()
    if not here.main:  # rank 0 shows the same warnings and the result, once
        warnings.simplefilter("ignore")
    summaries = [describe(a) for a in run_guarded(body)]
    if not here.main:
        return
    if json_out:
        emit_json(summaries)
    else:
        console.print(_table(summaries))
