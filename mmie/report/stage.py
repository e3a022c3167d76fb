"""`mmie report`: one self-contained HTML page from a run's artifacts (images inlined).

Sections are registered by artifact kind; each renders what its artifacts hold and says so
plainly when something is missing, so a partial run still gives a useful page.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmie.core.artifacts import MANIFEST, Artifact, load
from mmie.core.errors import ArtifactError


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


def esc(value: object) -> str:
    return html.escape(str(value))


def fmt(value: object) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict) and "value" in value:
        shown = fmt(value["value"]) if value["value"] is not None else "missing"
        return shown + (f" ({value['missing']})" if value.get("missing") else "")
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def artifact_png(art: Artifact, name: str) -> str:
    path = art.path / name
    return img_tag(path.read_bytes(), f"{art.kind} {name}") if path.is_file() else ""


def figure_png(draw: Callable) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def arm_label(art: Artifact) -> str:
    cfg = art.config
    return f"{cfg.get('arm', art.path.name)} / seed {cfg.get('seed', '-')}"


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
    def draw(plt):
        names = sorted({k for a in arts for k in _curves(a)})
        fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3))
        axes = axes if hasattr(axes, "__len__") else [axes]
        for ax, name in zip(axes, names):
            for art in arts:
                ax.plot(_curves(art).get(name, []), label=arm_label(art))
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
    out = table(["metric", *(arm_label(a) for a in arts)], rows)
    rates = {arm_label(a): _set_rates(a) for a in arts}
    sets = sorted({s for r in rates.values() for s in r})
    if sets:
        out += img_tag(figure_png(lambda plt: _heatmap(plt, rates, sets)), "language heatmap")
    return out


def _heatmap(plt, rates: dict, sets: list[str]):
    arms = list(rates)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.2 * len(sets) * 2, 1 + 0.5 * len(arms)))
    panels = ((axes[0], 0, "forget-language rate"), (axes[1], 1, "own-language rate"))
    for ax, which, title in panels:
        grid = [[rates[a].get(s, (math.nan, math.nan))[which] for s in sets] for a in arms]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(sets)), sets, rotation=45, ha="right")
        ax.set_yticks(range(len(arms)), arms)
        ax.set_title(title)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8)
    return fig


def _markdown_table(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    rows = [[c.strip().replace("**", "") for c in ln.strip("|").split("|")] for ln in lines]
    rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]
    return table(rows[0], rows[1:]) if rows else ""


def _listed(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def section_gates(arts: list[Artifact]) -> str:
    parts = []
    for art in arts:
        decisions = {arm: v for arm, v in art.metrics.items()
                     if isinstance(v, dict) and "decision" in v}
        parts.append(f"<p>{esc(art.path)}</p>")
        if decisions:
            parts.append(table(["arm", "decision", "gates passed", "gates failed"],
                               [[arm, v["decision"], v.get("passed", ""),
                                 _listed(v.get("failed", ""))]
                                for arm, v in decisions.items()]))
        if (art.path / "gate.md").is_file():
            parts.append(_markdown_table(art.read_text("gate.md")))
        parts.append(artifact_png(art, "forest.png"))
    return "".join(parts)


SECTIONS: dict[str, tuple[str, Callable[[list[Artifact]], str]]] = {
    "gate": ("Gate decisions", section_gates),
    "eval": ("Evaluation: metrics per arm and cross-lingual rates", section_evals),
    "layers": ("Layer selection", section_layers),
    "sae": ("Sparse autoencoders", section_sae),
    "adapter": ("Unlearning runs: training curves", section_adapters),
}

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0}"
         "img{max-width:100%;display:block;margin:1em 0}")


def render(arts: list[Artifact], title: str) -> str:
    by_kind: dict[str, list[Artifact]] = defaultdict(list)
    for art in arts:
        by_kind[art.kind].append(art)
    body = [f"<h1>{esc(title)}</h1>",
            table(["kind", "artifact", "model", "created"],
                  [[a.kind, a.path, (a.model.name if a.model else "-"),
                    a.manifest.get("created_at", "")] for a in arts])]
    for kind, (heading, render_section) in SECTIONS.items():
        if by_kind.get(kind):
            body.append(f"<h2>{esc(heading)}</h2>" + render_section(by_kind[kind]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


def run(config: ReportConfig) -> Path:
    """Render the report and write it atomically; returns its path."""
    page = render(find_artifacts(config.inputs), config.title)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
