"""What `mmie neurons` prints: one function per subcommand, from the artifact it wrote."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mmie.cli.common import emit_json, info, out
from mmie.core.artifacts import Artifact


def as_json(artifact: Artifact) -> None:
    emit_json({"artifact": str(artifact.path), **artifact.metrics})


def counts_table(title: str, per_layer: dict) -> Table:
    table = Table(title=title)
    for col in ("layer", "selected"):
        table.add_column(col, justify="right")
    for layer, n in per_layer.items():
        table.add_row(str(layer), str(n))
    return table


def score(artifact: Artifact, data: str) -> None:
    table = Table(title=f"neuron scores ({Path(data).name})")
    for col in ("layer", "mean Wanda"):
        table.add_column(col, justify="right")
    for layer, mean in artifact.metrics["wanda_mean"].items():
        table.add_row(str(layer), f"{mean:.4g}")
    out.print(table)
    info(f"scores written to {artifact.path}")


def select(artifact: Artifact) -> None:
    m = artifact.metrics
    out.print(counts_table("selected neurons", m["per_layer"]))
    info(f"{m['selected']} of {m['neurons']} neurons ({m['share']:.2%}); mask written to "
         f"{artifact.path}")
    if m.get("exclusive"):
        shared = ", ".join(f"{lang} {n}" for lang, n in m["shared_with"].items())
        info(f"exclusive to {m['target_lang']}: left out those also selected for ({shared})")


def finetune(artifact: Artifact) -> None:
    m = artifact.metrics
    info(f"{m['steps']} steps, loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}; "
         f"{m['n_frozen']} frozen neurons bit-identical: {m['frozen_bit_identical']}")
    if m.get("lora_touches_mlp"):
        info(f"[yellow]LoRA adapts {', '.join(m['lora_touches_mlp'])}: the frozen neurons' "
             "effective weights can change[/]")
    info(f"{artifact.kind} artifact written to {artifact.path}")


def compare(artifact: Artifact, score_name: str) -> None:
    m = artifact.metrics
    table = Table(title=f"{score_name} score dynamics")
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


def ablate(artifact: Artifact, data: str | None, scale: float) -> None:
    m = artifact.metrics
    for row in artifact.read_jsonl("demo.jsonl"):
        out.print(f"[bold]{row['prompt']}[/]\n  before: {row['before']}\n  after:  {row['after']}")
    if isinstance(m["nll_before"], float):
        out.print(f"mean NLL on {data}: {m['nll_before']:.4f} -> {m['nll_after']:.4f}")
    info(f"{m['selected']} neurons scaled by {scale:g}; ablation arm written to {artifact.path}")
