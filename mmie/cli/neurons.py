"""`mmie neurons score|select|finetune|compare|ablate`: neuron-level analysis."""

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
    emit_json,
    info,
    model_spec,
    out,
    progress,
    run_guarded,
    writes,
)

neurons_app = typer.Typer(
    help="Neuron-level analysis: Wanda / LAPE scores, neuron selection, frozen-neuron "
         "fine-tuning, score dynamics (drift vs redistribution) and ablation.",
    no_args_is_help=True)
app.add_typer(neurons_app, name="neurons")

FieldOpt = Annotated[str, typer.Option(help="JSON field or table column with the text.")]
MaxLengthOpt = Annotated[int, typer.Option(help="Tokens per text.")]
LayersOpt = Annotated[str | None, typer.Option(
    help="Blocks, e.g. '0,3,8-12' (default: all).")]


def parse_pairs(items: list[str] | None, option: str) -> tuple[tuple[str, str], ...]:
    """NAME=VALUE pairs from a repeated option."""
    pairs = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise typer.BadParameter(f"'{item}' is not NAME=VALUE", param_hint=option)
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def parse_layers(text: str | None, option: str = "--layers") -> tuple[int, ...] | None:
    """'0,3,8-12' -> (0, 3, 8, 9, 10, 11, 12); None stays None."""
    if text is None:
        return None
    layers = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            layers += range(int(low), int(high or low) + 1)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a list like 0,3,8-12",
                                 param_hint=option) from None
    return tuple(layers)


def parse_share(text: str) -> float:
    """'3%' or '0.03' -> 0.03."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a share like 3% or 0.03",
                                 param_hint="--top") from None
    if not 0 < value <= 1:
        raise typer.BadParameter(f"'{text}' is not in (0, 100%]", param_hint="--top")
    return value


def _counts_table(title: str, per_layer: dict) -> Table:
    table = Table(title=title)
    for col in ("layer", "selected"):
        table.add_column(col, justify="right")
    for layer, n in per_layer.items():
        table.add_row(str(layer), str(n))
    return table


@neurons_app.command("score")
def score_cmd(
    data: Annotated[str, typer.Option(help="Texts whose neuron (Wanda) scores are computed.")],
    out_dir: OutOpt,
    model: ModelOpt = "default",
    lang: Annotated[list[str] | None, typer.Option(
        "--lang", help="NAME=FILE set whose activation probabilities are stored too (for "
                       "LAPE); repeat.")] = None,
    adapter: Annotated[str | None, typer.Option(
        help="Score the model fine-tuned by this artifact (adapter, or neurons finetune).")] = None,
    layers: LayersOpt = None,
    max_samples: Annotated[int | None, typer.Option(help="At most this many texts per set.")] = 200,
    max_length: MaxLengthOpt = 128,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 8,
    field: FieldOpt = "text",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Wanda scores and activation probabilities of every MLP neuron on a text set."""
    from mmie.neurons import ScoreConfig, run_score

    langs, chosen = parse_pairs(lang, "--lang"), parse_layers(layers)
    artifact = run_guarded(lambda: run_score(writes(ScoreConfig(
        model=model_spec(model, device, dtype, device_map, blocks_path, max_memory),
        data=data, field=field,
        langs=langs, adapter=adapter, layers=chosen, max_samples=max_samples,
        max_length=max_length, batch_size=batch_size, seed=seed), out_dir, force),
        out_dir, force=force, progress=progress()))
    metrics = artifact.metrics
    if json_out:
        emit_json({"artifact": str(artifact.path), **metrics})
        return
    table = Table(title=f"neuron scores ({Path(data).name})")
    for col in ("layer", "mean Wanda"):
        table.add_column(col, justify="right")
    for layer, mean in metrics["wanda_mean"].items():
        table.add_row(str(layer), f"{mean:.4g}")
    out.print(table)
    info(f"scores written to {artifact.path}")


@neurons_app.command("select")
def select_cmd(
    out_dir: OutOpt,
    target: Annotated[str | None, typer.Option(
        help="Score artifact of the set whose neurons are wanted (with --lape: its --lang "
             "sets are used).")] = None,
    reference: Annotated[str | None, typer.Option(
        help="Score artifact of the set the neurons must not matter for.")] = None,
    top: Annotated[str, typer.Option(help="Top share per set, e.g. 3% or 0.03.")] = "3%",
    scope: Annotated[str, typer.Option(help="Rank per 'layer' or over all layers ('global').")
                     ] = "layer",
    score: Annotated[str, typer.Option(
        help="Score ranked: wanda, act_norm, act_prob, gate_proj.rows, up_proj.rows.")] = "wanda",
    lape: Annotated[bool, typer.Option("--lape", help="LAPE language-specific neurons.")] = False,
    lang: Annotated[list[str] | None, typer.Option(
        "--lang", help="--lape: NAME=DIR score artifact of one language; repeat.")] = None,
    target_lang: Annotated[str | None, typer.Option(
        help="--lape: language whose neurons are selected (default: the first).")] = None,
    lape_quantile: Annotated[float, typer.Option(
        help="--lape: share of all neurons with the lowest entropy.")] = 0.01,
    min_prob: Annotated[float | None, typer.Option(
        help="--lape: activation-probability threshold (default: --prob-quantile).")] = None,
    prob_quantile: Annotated[float, typer.Option(
        help="--lape: quantile of all probabilities used as threshold.")] = 0.95,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Select neurons: top-p% of target minus top-p% of reference, or LAPE (--lape)."""
    from mmie.neurons import SelectConfig, run_select

    share, langs = parse_share(top), parse_pairs(lang, "--lang")
    artifact = run_guarded(lambda: run_select(writes(SelectConfig(
        method="lape" if lape else "diff", target=target, reference=reference, top=share,
        scope=scope, score=score, langs=langs, target_lang=target_lang,
        lape_quantile=lape_quantile, min_prob=min_prob, prob_quantile=prob_quantile),
        out_dir, force),
        out_dir, force=force))
    m = artifact.metrics
    if json_out:
        emit_json({"artifact": str(artifact.path), **m})
        return
    out.print(_counts_table("selected neurons", m["per_layer"]))
    info(f"{m['selected']} of {m['neurons']} neurons ({m['share']:.2%}); mask written to "
         f"{artifact.path}")


@neurons_app.command("finetune")
def finetune_cmd(
    neurons: Annotated[str, typer.Option(help="Mask artifact of the neurons to freeze.")],
    data: Annotated[str, typer.Option(help="Texts to fine-tune on (next-token NLL).")],
    out_dir: OutOpt,
    model: ModelOpt = "default",
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters, base frozen.")] = False,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale alpha / rank).")] = 16.0,
    target_modules: Annotated[str, typer.Option(
        help="LoRA target linear layers, comma-separated.")] = "q_proj,v_proj",
    lora_layers: LayersOpt = None,
    train_layers: Annotated[str | None, typer.Option(
        help="Full mode: blocks whose MLP trains (default: those with a frozen neuron).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    steps: Annotated[int | None, typer.Option(help="Exact optimizer steps (overrides epochs).")
                     ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam lr (default 5e-4 LoRA, 1e-5 full).")
                  ] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per step.")] = 4,
    max_length: MaxLengthOpt = 128,
    max_samples: Annotated[int | None, typer.Option(help="At most this many texts.")] = None,
    field: FieldOpt = "text",
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune with the selected neurons frozen (gradient masks), or LoRA around them."""
    from mmie.neuron_finetune import FinetuneConfig, run_finetune

    modules = tuple(t.strip() for t in target_modules.split(",") if t.strip())
    lora_l, train_l = parse_layers(lora_layers), parse_layers(train_layers, "--train-layers")
    artifact = run_guarded(lambda: run_finetune(writes(FinetuneConfig(
        model=model_spec(model, device, dtype, device_map, blocks_path, max_memory),
        neurons=neurons,
        data=data, field=field, lora=lora, rank=rank, alpha=alpha, target_modules=modules,
        lora_layers=lora_l, train_layers=train_l, epochs=epochs, steps=steps, lr=lr,
        batch_size=batch_size, max_length=max_length, max_samples=max_samples, seed=seed),
        out_dir, force),
        out_dir, force=force, progress=progress()))
    m = artifact.metrics
    if json_out:
        emit_json({"artifact": str(artifact.path), **m})
        return
    info(f"{m['steps']} steps, loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}; "
         f"{m['n_frozen']} frozen neurons bit-identical: {m['frozen_bit_identical']}")
    if m.get("lora_touches_mlp"):
        info(f"[yellow]LoRA adapts {', '.join(m['lora_touches_mlp'])}: the frozen neurons' "
             "effective weights can change[/]")
    info(f"{artifact.kind} artifact written to {artifact.path}")


@neurons_app.command("compare")
def compare_cmd(
    before: Annotated[str, typer.Option(help="Score artifact before fine-tuning.")],
    after: Annotated[str, typer.Option(help="Score artifact after (score --adapter ...).")],
    neurons: Annotated[str, typer.Option(help="Mask artifact of the frozen neurons.")],
    out_dir: OutOpt,
    drift: Annotated[float, typer.Option(
        help="Hypothesis A when the frozen neurons' mean relative change < -drift.")] = 0.10,
    stable: Annotated[float, typer.Option(
        help="Hypothesis B when |mean relative change| < stable.")] = 0.05,
    score: Annotated[str, typer.Option(help="Score compared.")] = "wanda",
    n_perm: Annotated[int, typer.Option(help="Permutations of the permutation test.")] = 2000,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Score dynamics of frozen vs other neurons and the Hypothesis A / B verdict."""
    from mmie.neuron_compare import CompareConfig, run_compare

    artifact = run_guarded(lambda: run_compare(writes(CompareConfig(
        before=before, after=after, neurons=neurons, drift=drift, stable=stable, score=score,
        n_perm=n_perm, seed=seed), out_dir, force), out_dir, force=force))
    m = artifact.metrics
    if json_out:
        emit_json({"artifact": str(artifact.path), **m})
        return
    table = Table(title=f"{score} score dynamics")
    for col in ("neurons", "n", "mean before", "mean after", "mean rel. change", "median"):
        table.add_column(col, justify="right")
    for group in ("frozen", "other"):
        g = m[group]
        cells = (g["before"]["mean"], g["after"]["mean"], g["change"]["mean"],
                 g["change"]["median"])
        table.add_row(group, str(g["change"]["n"]),
                      *("—" if v is None else f"{v:.4g}" for v in cells))
    out.print(table)
    p = lambda t: "—" if m[t].get("p") is None else f"{m[t]['p']:.3g}"  # noqa: E731
    out.print(f"verdict: [bold]{m['verdict']}[/] ({m['verdict_label']}); Mann-Whitney p="
              f"{p('mann_whitney')}, permutation p={p('perm')}")
    info(f"compare written to {artifact.path} (hist_scores.png, hist_change.png)")


@neurons_app.command("ablate")
def ablate_cmd(
    neurons: Annotated[str, typer.Option(help="Mask artifact of the neurons to scale.")],
    out_dir: OutOpt,
    model: ModelOpt = "default",
    scale: Annotated[float, typer.Option(help="Factor on their activations (0 = ablate).")
                     ] = 0.0,
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", help="Prompt continued before and after; repeat.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per demo continuation.")] = 32,
    data: Annotated[str | None, typer.Option(help="Texts for a before/after mean NLL.")] = None,
    max_samples: Annotated[int, typer.Option(help="Texts of --data used.")] = 32,
    max_length: MaxLengthOpt = 128,
    field: FieldOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    blocks_path: BlocksPathOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Scale the selected neurons' activations: an ablation arm, with a before/after demo."""
    from mmie.neurons import AblateConfig, run_ablate

    artifact = run_guarded(lambda: run_ablate(writes(AblateConfig(
        model=model_spec(model, device, dtype, device_map, blocks_path, max_memory),
        neurons=neurons,
        scale=scale, prompts=tuple(prompt or ()), max_new_tokens=max_new_tokens, data=data,
        field=field, max_samples=max_samples, max_length=max_length),
        out_dir, force), out_dir, force=force))
    m = artifact.metrics
    if json_out:
        emit_json({"artifact": str(artifact.path), **m})
        return
    for row in artifact.read_jsonl("demo.jsonl"):
        out.print(f"[bold]{row['prompt']}[/]\n  before: {row['before']}\n  after:  {row['after']}")
    if isinstance(m["nll_before"], float):
        out.print(f"mean NLL on {data}: {m['nll_before']:.4f} -> {m['nll_after']:.4f}")
    info(f"{m['selected']} neurons scaled by {scale:g}; ablation arm written to {artifact.path}")
