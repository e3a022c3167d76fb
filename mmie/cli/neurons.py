"""`mmie neurons score|select|refine|finetune|compare|ablate`: neuron-level analysis."""

from __future__ import annotations

from typing import Annotated

import typer

from mmie.cli import neurons_views as views
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
    info,
    model_spec,
    progress,
    run_guarded,
    writes,
)
from mmie.cli.options import (
    BatchSizeOpt,
    FieldOpt,
    LayersOpt,
    MaxLengthOpt,
    MaxSamplesOpt,
    parse_layers,
    parse_pairs,
    parse_share,
)

neurons_app = typer.Typer(
    help="Neuron-level analysis: Wanda / LAPE scores, neuron selection, frozen-neuron "
         "fine-tuning, score dynamics (drift vs redistribution) and ablation.",
    no_args_is_help=True)
app.add_typer(neurons_app, name="neurons")

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
    max_samples: MaxSamplesOpt = 200,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchSizeOpt = 8,
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
    from mmie.neurons.stage import ScoreConfig, run_score

    langs, chosen = parse_pairs(lang, "--lang"), parse_layers(layers)
    artifact = run_guarded(lambda: run_score(writes(ScoreConfig(
        model=model_spec(model, device, dtype, device_map, blocks_path, max_memory),
        data=data, field=field,
        langs=langs, adapter=adapter, layers=chosen, max_samples=max_samples,
        max_length=max_length, batch_size=batch_size, seed=seed), out_dir, force),
        out_dir, force=force, progress=progress()))
    if json_out:
        return views.as_json(artifact)
    views.score(artifact, data)


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
    exclusive: Annotated[bool, typer.Option(
        "--exclusive", help="--lape: keep only neurons selected for --target-lang and for no "
                            "other --lang (the protected languages).")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Select neurons: top-p% of target minus top-p% of reference, or LAPE (--lape)."""
    from mmie.neurons.stage import SelectConfig, run_select

    share, langs = parse_share(top), parse_pairs(lang, "--lang")
    artifact = run_guarded(lambda: run_select(writes(SelectConfig(
        method="lape" if lape else "diff", target=target, reference=reference, top=share,
        scope=scope, score=score, langs=langs, target_lang=target_lang,
        lape_quantile=lape_quantile, min_prob=min_prob, prob_quantile=prob_quantile,
        exclusive=exclusive),
        out_dir, force),
        out_dir, force=force))
    if json_out:
        return views.as_json(artifact)
    views.select(artifact)


@neurons_app.command("refine")
def refine_cmd(
    neurons: Annotated[str, typer.Option(help="Mask artifact to refine (e.g. from select "
                                              "--lape --exclusive).")],
    forget: Annotated[str, typer.Option(help="NAME=FILE of the forget language.")],
    protect: Annotated[list[str], typer.Option(
        "--protect", help="NAME=FILE of a protected language; repeat.")],
    out_dir: OutOpt,
    model: ModelOpt = "default",
    max_ratio: Annotated[float, typer.Option(
        help="Keep a neuron when ablating it costs every protected language at most this "
             "share of what it costs the forget language.")] = 0.5,
    min_effect: Annotated[float, typer.Option(
        help="Nats of forget-language NLL a neuron's ablation must add to count.")] = 0.0,
    n_texts: Annotated[int, typer.Option(help="Texts per language (the first ones).")] = 16,
    max_length: MaxLengthOpt = 64,
    batch_size: BatchSizeOpt = 8,
    field: FieldOpt = "text",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Keep only the selected neurons whose measured ablation effect hurts the forget language
    more than every protected language (one forward pass per neuron and language)."""
    from mmie.neurons.refine import RefineConfig, run_refine

    forget_pair = parse_pairs([forget], "--forget", "NAME=FILE")[0]
    artifact = run_guarded(lambda: run_refine(writes(RefineConfig(
        neurons=neurons, forget=forget_pair, protect=tuple(parse_pairs(protect, "--protect",
                                                                       "NAME=FILE")),
        model=model_spec(model, device, dtype), field=field, n_texts=n_texts,
        max_length=max_length, batch_size=batch_size, max_ratio=max_ratio,
        min_effect=min_effect), out_dir, force), out_dir, force=force, progress=progress()))
    if json_out:
        return views.as_json(artifact)
    m = artifact.metrics
    info(f"kept {m['kept']['selected']} of {m['input']['selected']} neurons; mean ablation "
         "effect (nats): " + ", ".join(f"{k} {v:+.4f}" for k, v in m["mean_effect"].items()))
    info(f"artifact written to {artifact.path}")


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
    from mmie.neurons.finetune import FinetuneConfig, run_finetune

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
    if json_out:
        return views.as_json(artifact)
    views.finetune(artifact)


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
    from mmie.neurons.compare import CompareConfig, run_compare

    artifact = run_guarded(lambda: run_compare(writes(CompareConfig(
        before=before, after=after, neurons=neurons, drift=drift, stable=stable, score=score,
        n_perm=n_perm, seed=seed), out_dir, force), out_dir, force=force))
    if json_out:
        return views.as_json(artifact)
    views.compare(artifact, score)


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
    from mmie.neurons.stage import AblateConfig, run_ablate

    artifact = run_guarded(lambda: run_ablate(writes(AblateConfig(
        model=model_spec(model, device, dtype, device_map, blocks_path, max_memory),
        neurons=neurons,
        scale=scale, prompts=tuple(prompt or ()), max_new_tokens=max_new_tokens, data=data,
        field=field, max_samples=max_samples, max_length=max_length),
        out_dir, force), out_dir, force=force))
    if json_out:
        return views.as_json(artifact)
    views.ablate(artifact, data, scale)

