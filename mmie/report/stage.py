"""`mmie report`: one self-contained HTML page from a run's artifacts (images inlined).

Sections are registered by artifact kind; each renders what its artifacts hold and says so
plainly when something is missing, so a partial run still gives a useful page.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmie.core.artifacts import MANIFEST, Artifact, load
from mmie.core.errors import ArtifactError
from mmie.core.registry import Registry
from mmie.report import summary
from mmie.report.depth import section_depth
from mmie.report.gates import gate_section
from mmie.report.html import (
    arm_label,
    artifact_png,
    esc,
    figure_png,
    fit_scale,
    img_tag,
    table,
)


@dataclass(frozen=True)
class ReportConfig:
    """Settings of `mmie report`.

    inputs: folders searched (recursively) for artifacts.
    out: the HTML file to write.
    title: page title.
    """

    inputs: tuple[str, ...]
    out: str
    title: str = "mmie report"

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no input folders")
        if not self.out.endswith((".html", ".htm")):
            raise ValueError(f"--out must be an .html file, got '{self.out}'")


def find_artifacts(roots: Sequence[str]) -> list[Artifact]:
    found = []
    for root in roots:
        root_path = Path(root)
        if not root_path.exists():
            raise ArtifactError(f"{root}: no such folder")
        for manifest in sorted(root_path.rglob(MANIFEST)):
            parts = manifest.parent.relative_to(root_path).parts
            if not any(part.startswith(".") for part in parts):  # temp or checkpoint folders
                found.append(load(manifest.parent))
    if not found:
        raise ArtifactError(f"no mmie artifacts under {', '.join(roots)}")
    return found


def _reason_text(reason: object) -> str:
    return reason.get("text", str(reason)) if isinstance(reason, dict) else str(reason)


def section_layers(arts: list[Artifact]) -> str:
    parts = []
    for art in arts:
        chosen = art.metrics.get("chosen", [])
        reasons = art.metrics.get("reasons", {})
        rows = [[layer, _reason_text(reasons.get(str(layer), ""))] for layer in chosen]
        parts.append(f"<p>{esc(art.path)}</p>" + table(["chosen layer", "why"], rows)
                     + artifact_png(art, "layers.png"))
    return "".join(parts)


def section_sae(arts: list[Artifact]) -> str:
    parts = []
    for art in arts:
        quality = art.metrics.get("layers", {})
        keys = sorted({k for q in quality.values() if isinstance(q, dict)
                       for k, v in q.items() if isinstance(v, (int, float))})
        rows = [[layer, *(q.get(k, "") for k in keys)] for layer, q in sorted(quality.items())]
        selected = art.metrics.get("selected", {})
        sel_rows = [[layer, ", ".join(map(str, ids[:12]))]
                    for layer, ids in sorted(selected.items())]
        parts.append(f"<p>{esc(art.path)}</p>" + table(["layer", *keys], rows)
                     + table(["layer", "top forget features"], sel_rows))
    return "".join(parts)


def _curves(art: Artifact) -> dict[str, list[float]]:
    curves: dict[str, list[float]] = defaultdict(list)
    for value in art.metrics.values():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for row in value:
                for key, number in row.items():
                    if isinstance(number, (int, float)) and key != "step":
                        curves[key].append(float(number))
    return curves


def section_adapters(arts: list[Artifact]) -> str:
    def draw(figure):
        names = sorted({k for a in arts for k in _curves(a)})
        fig = figure(figsize=(4 * max(1, len(names)), 3), layout="constrained")
        axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
        for ax, name in zip(axes, names):
            for art in arts:
                ax.plot(_curves(art).get(name, []), label=arm_label(art))
            fit_scale(ax, [v for a in arts for v in _curves(a).get(name, [])])
            ax.set_title(name)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        return fig

    if not any(_curves(a) for a in arts):
        return "<p>No training curves recorded in the adapter artifacts.</p>"
    rows = [[arm_label(a), a.config.get("method", ""), a.config.get("objective", ""),
             a.config.get("steps", "")] for a in arts]
    return table(["adapter", "method", "objective", "steps"], rows) + img_tag(
        figure_png(draw), "training curves")


def _set_rates(art: Artifact) -> dict[str, tuple[float, float]]:
    if not (art.path / "samples.jsonl").is_file():
        return {}
    grouped: dict[str, list[dict]] = defaultdict(list)
    for rec in art.read_jsonl("samples.jsonl"):
        grouped[rec["set"]].append(rec)
    rates = {}
    for name, recs in grouped.items():
        own = [r["is_own"] for r in recs if r.get("is_own") is not None]
        rates[name] = (sum(r["is_forget"] for r in recs) / len(recs),
                       sum(own) / len(own) if own else math.nan)
    return rates


def section_evals(arts: list[Artifact]) -> str:
    names = sorted({k for a in arts for k, v in a.metrics.items() if isinstance(v, dict)})
    rows = [[name, *(a.metrics.get(name, "") for a in arts)] for name in names]
    out = table(["metric", *(arm_label(a) for a in arts)], rows, cls="metrics")
    rates = {arm_label(a): _set_rates(a) for a in arts}
    sets = sorted({s for r in rates.values() for s in r})
    if sets:
        out += img_tag(figure_png(lambda figure: _heatmap(figure, rates, sets)),
                       "language heatmap")
    return out


def _heatmap(figure, rates: dict, sets: list[str]):
    """Two panels stacked, each with its own row labels: side by side, the right panel's
    labels ran into the left panel's cells."""
    arms = list(rates)
    panel = 0.5 + 0.4 * len(arms)
    fig = figure(figsize=(2 + 0.07 * max(map(len, arms)) + 0.75 * len(sets), 1.2 + 2 * panel),
                 layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    panels = ((axes[0], 0, "forget-language rate"), (axes[1], 1, "own-language rate"))
    for ax, which, title in panels:
        grid = [[rates[a].get(s, (math.nan, math.nan))[which] for s in sets] for a in arms]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(arms)), arms)
        ax.set_title(title, fontsize=10)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                shown, color = ("-", "k") if math.isnan(value) else (f"{value:.2f}", "w")
                ax.text(j, i, shown, ha="center", va="center", color=color, fontsize=8)
    axes[1].set_xticks(range(len(sets)), sets, rotation=45, ha="right")
    fig.colorbar(im, ax=axes, shrink=0.8)
    return fig


def section_gates(arts: list[Artifact]) -> str:
    return "".join(gate_section(art) for art in arts)


Section = tuple[str, Callable[[list[Artifact]], str]]  # heading, renderer
SECTIONS: Registry[Section] = Registry("report section")  # by artifact kind, in page order
SECTIONS.add("gate", ("Gate decisions: every gate", section_gates))
SECTIONS.add("comprehension", ("Depth: is it gone or hidden?", section_depth))
SECTIONS.add("relearn", ("Depth: is it gone or hidden?", section_depth))
SECTIONS.add("steering", ("Depth: is it gone or hidden?", section_depth))
SECTIONS.add("eval", ("Evaluation: metrics per arm and cross-lingual rates", section_evals))
SECTIONS.add("layers", ("Layer selection", section_layers))
SECTIONS.add("sae", ("Sparse autoencoders", section_sae))
SECTIONS.add("adapter", ("Unlearning runs: training curves", section_adapters))

STYLE = ("body{font-family:system-ui,sans-serif;margin:1.2em 2em;max-width:1400px}"
         "h1{font-size:1.4em;margin:0.2em 0}h2{font-size:1.2em;margin-top:1.6em}"
         "table{border-collapse:collapse;margin:0.6em 0;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
         "th{background:#f0f0f0}table.answer{font-size:14px}table.answer td:first-child"
         "{font-weight:600}table.examples td{max-width:22em;overflow-wrap:anywhere}"
         ".lab{color:#777;font-size:11px}.notes{font-size:13px;margin:0.3em 0}"
         ".d{font-weight:700;padding:0 4px;border-radius:3px}.d-proceed,.d-pass{color:#fff;"
         "background:#2a7d2a}.d-stop,.d-fail{color:#fff;background:#b22222}"
         ".d-report,.d-not-informative{color:#333;background:#ddd}"
         "img{max-width:100%;display:block;margin:1em 0}")


def answer(by_kind: dict[str, list[Artifact]]) -> list[str]:
    """The opening: one row per arm, plainly worded gate notes, then the side-by-side."""
    arms = summary.group_arms(by_kind.get("eval", []))
    report = summary.latest_gate(by_kind.get("gate", []))
    forget = arms[0].evals[0].config.get("forget_lang", "forget") if arms else "forget"
    return ['<section id="answer">', summary.headline(arms, report),
            summary.gate_notes(report), "</section>",
            f"<h2>The same {esc(summary.lang_name(str(forget)))} prompts, each arm's answer "
            "(first seed)</h2>", summary.side_by_side(arms)] if arms else []


def render(arts: list[Artifact], title: str) -> str:
    by_kind: dict[str, list[Artifact]] = defaultdict(list)
    for art in arts:
        by_kind[art.kind].append(art)
    body = [f"<h1>{esc(title)}</h1>", *answer(by_kind)]
    done: set[Callable] = set()
    for kind, (heading, render_section) in SECTIONS.items():
        if by_kind.get(kind) and render_section not in done:
            done.add(render_section)
            body.append(f"<h2>{esc(heading)}</h2>" + render_section(arts_of(by_kind, kind)))
    body.append("<h2>Artifacts</h2>" + table(
        ["kind", "artifact", "model", "created"],
        [[a.kind, a.path, (a.model.name if a.model else "-"), a.manifest.get("created_at", "")]
         for a in arts]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


DEPTH_KINDS = ("comprehension", "relearn", "steering")


def arts_of(by_kind: dict[str, list[Artifact]], kind: str) -> list[Artifact]:
    """The depth section takes every depth kind at once."""
    if kind in DEPTH_KINDS:
        return [a for k in DEPTH_KINDS for a in by_kind.get(k, [])]
    return by_kind[kind]


def run(config: ReportConfig) -> Path:
    """Render the report and write it atomically; returns its path."""
    page = render(find_artifacts(config.inputs), config.title)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
