"""`mmie evaluate`: language rates, language mass, fluency, perplexity, MIA and probe AUC of a
model or an arm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mmie.cli.app import app
from mmie.cli.common import (
    BlocksPathOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    MaxMemoryOpt,
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
from mmie.cli.options import BatchSizeOpt, FieldOpt, parse_pairs
from mmie.core.distributed import world
from mmie.core.generation import EVAL_REPETITION_PENALTY

SET_COLUMNS = (("forget_rate", "forget lang"), ("own_rate", "own lang"),
               ("degenerate_rate", "degenerate"), ("und_rate", "und"), ("fluent_rate", "fluent"),
               ("fluency_nll", "fluency NLL"), ("distinct_2", "distinct-2"))
MASS_COLUMNS = (("forget", "forget mass"), ("own", "own mass"), ("replacement", "repl. mass"))
SUMMARY = ("retain_ppl", "forget_ppl", "retain_ppl_ratio", "substitution.protected",
           "substitution.replacement", "romanized.romanized_rate", "mia_auc_loss",
           "mia_auc_mink_pp", "probe_auc")


def _fmt(entry: dict | None) -> str:
    value = (entry or {}).get("value")
    return "—" if value is None else f"{value:.3f}"


def _table(metrics: dict, sets: list[str], arm: str) -> Table:
    table = Table(title=f"evaluate: arm {arm}")
    table.add_column("set")
    for _, label in (*SET_COLUMNS, *MASS_COLUMNS):
        table.add_column(label, justify="right")
    table.add_column("n", justify="right")
    for name in sets:
        entries = [metrics.get(f"{name}.{key}") for key, _ in SET_COLUMNS] + \
            [metrics.get(f"mass.{name}.{key}") for key, _ in MASS_COLUMNS]
        table.add_row(name, *map(_fmt, entries), str(metrics[f"{name}.forget_rate"]["n"]))
    return table


def _summary(metrics: dict) -> Table:
    table = Table(title="model-level metrics")
    for col in ("metric", "value", "n", "missing"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for name in SUMMARY:
        entry = metrics.get(name)
        if entry:
            table.add_row(name, _fmt(entry), str(entry["n"]), entry.get("missing", ""))
    return table


@app.command("evaluate")
def evaluate_cmd(
    forget: Annotated[str, typer.Option(help="Held-out texts of the language to forget.")],
    retain: Annotated[str, typer.Option(help="Held-out texts of the language to keep.")],
    out: OutOpt,
    model: ModelOpt = "default",
    adapter: Annotated[str | None, typer.Option(
        help="Adapter artifact (from `mmie unlearn`), or a neurons mask/ablation artifact "
             "(`mmie neurons select|ablate`), to evaluate; none = the base model.")] = None,
    sae: Annotated[str | None, typer.Option(help="SAE artifact for --sae-gate.")] = None,
    sae_gate: Annotated[bool, typer.Option(
        "--sae-gate", help="Gate the forget-language SAE features (needs --sae).")] = False,
    gate_strength: Annotated[float | None, typer.Option(
        help="SAE gate strength (default: the artifact's).")] = None,
    script_scrub: Annotated[str | None, typer.Option(
        "--script-scrub", help="Script-scrub artifact to apply.")] = None,
    neuron_scale: Annotated[float | None, typer.Option(
        help="With a neurons mask/ablation artifact as --adapter: factor on its neurons' "
             "activations (default: the artifact's scale, 0 for a mask).")] = None,
    xlang: Annotated[list[str] | None, typer.Option(
        help="LANG=FILE protected related language (leakage, collateral damage); repeat.")] = None,
    romanized: Annotated[str | None, typer.Option(help="Romanized forget-language texts.")] = None,
    mixed: Annotated[str | None, typer.Option(help="Code-mixed texts.")] = None,
    adversarial: Annotated[str | None, typer.Option(
        help="Instructions asking for the forget language (used whole as prompts).")] = None,
    forget_train: Annotated[str | None, typer.Option(
        help="Texts unlearning trained on: membership-inference members.")] = None,
    layers: Annotated[str | None, typer.Option(
        help="Layers artifact (`mmie select-layers`): probe its chosen layers.")] = None,
    baseline: Annotated[str | None, typer.Option(
        help="Eval artifact of the base model, for the retain perplexity ratio.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 48,
    n_prompts: Annotated[int, typer.Option(help="First N texts of each set.")] = 16,
    batch_size: BatchSizeOpt = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples (seeded).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus mass when sampling.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(
        help="Penalty on repeated tokens (1.0 = off); keeps small models out of loops."),
    ] = EVAL_REPETITION_PENALTY,
    arm: Annotated[str | None, typer.Option(
        help="Arm name for `mmie gate` (default: base, or the adapter's method-objective "
             "plus +sae-gate / +scrub).")] = None,
    forget_lang: Annotated[str, typer.Option(help="Language to forget (ISO code).")] = "hi",
    retain_lang: Annotated[str, typer.Option(help="Language of --retain.")] = "en",
    replacement_lang: Annotated[str, typer.Option(
        help="Language expected to replace the forgotten one.")] = "en",
    protected: Annotated[str, typer.Option(
        help="Comma-separated related languages whose use counts as substitution.")] = "ur,pa,bn",
    fluency_tolerance: Annotated[float, typer.Option(
        help="Nats per token above the retain reference's median fluency NLL that a "
             "continuation may score and still count as fluent.")] = 1.0,
    head_dtype: Annotated[str, typer.Option(
        "--head-dtype", help="LM-head matmul precision while generating and scoring: fp32 or "
                             "bf16 (faster on CPUs with AVX-512 BF16; each row's largest "
                             "logits, the scored tokens and every sum stay fp32, so greedy "
                             "continuations are the fp32 ones).")] = "fp32",
    body_dtype: Annotated[str, typer.Option(
        "--body-dtype", help="Precision of the decoder body's linear layers: fp32 or bf16 "
                             "(much faster on CPUs with AMX / AVX-512 BF16, but some greedy "
                             "continuations change; recorded in the data block, so the "
                             "baseline and every arm must use the same).")] = "fp32",
    engine: Annotated[str, typer.Option(
        help="Greedy decoding: auto (mmie's loop where it applies: the same tokens as "
             "transformers' generate, faster on CPU) or transformers (always generate).")
    ] = "auto",
    field: FieldOpt = "text",
    strict: Annotated[bool, typer.Option(
        "--strict", help="A metric that cannot be computed is an error, not a gap.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Measure what a model (or an arm) still says, in which language, and at what cost.

    --head-dtype bf16 computes the LM head (most of a decode step for Gemma 3's 262k-token
    vocabulary) in bf16 while generating and scoring; each row's largest logits, the scored
    tokens and every sum stay fp32, so greedy continuations are the fp32 ones and
    log-probabilities move by under 0.004 nats. Recorded in the manifest (config.head_dtype).
    --body-dtype bf16 computes the decoder body's projections in bf16 as well: about 1.4x
    faster again on the default model, but some continuations change (rates within their
    intervals on the demo); gate refuses a baseline and an arm evaluated with different ones.

    Shards across processes under `torchrun --nproc_per_node N -m mmie evaluate ...` or
    `accelerate launch --multi_gpu --num_processes N -m mmie evaluate ...`, with the same
    output as one.
    """
    from mmie.evaluate.stage import EvalConfig, run

    pairs = parse_pairs(xlang, "--xlang", "LANG=FILE")

    def body():
        config = EvalConfig(
            model=model_spec(model, device, dtype, device_map, blocks_path, max_memory),
            forget=forget, retain=retain, xlang=pairs, romanized=romanized, mixed=mixed,
            adversarial=adversarial,
            forget_train=forget_train, layers=layers, baseline=baseline, adapter=adapter,
            sae=sae, sae_gate=sae_gate, gate_strength=gate_strength, scrub=script_scrub, arm=arm,
            neuron_scale=neuron_scale,
            n_prompts=n_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
            seed=seed, forget_lang=forget_lang,
            retain_lang=retain_lang, replacement_lang=replacement_lang,
            protected=tuple(p.strip() for p in protected.split(",") if p.strip()),
            fluency_tolerance=fluency_tolerance, head_dtype=head_dtype, body_dtype=body_dtype,
            engine=engine,
            field=field,
            strict=strict)
        return run(config, Path(out), force=force, progress=progress())

    artifact = run_guarded(body)
    if not world().main:  # under a launcher rank 0 reports for every process
        return
    metrics, arm_name = artifact.metrics, artifact.config["arm"]
    sets = sorted({key.split(".")[0] for key in metrics if key.endswith(".forget_rate")},
                  key=lambda s: (s not in ("forget", "retain"), s))
    console.print(_table(metrics, sets, arm_name))
    console.print(_summary(metrics))
    info(f"arm '{arm_name}': eval artifact written to {artifact.path}")
    if json_out:
        emit_json({"artifact": str(artifact.path), "arm": arm_name, "metrics": metrics})
