"""The report's depth section: relearning recovery curves, parallel-sentence retrieval and
steering recovery.

Reads the ``relearn``, ``comprehension`` and ``steering`` artifacts (docs/internals.md lists their
metrics) as data; it imports nothing from :mod:`mmie.depth`. A recovery fraction near 0 after the
attack means the arm's removal held, near 1 that the attack brought the base model's level back; a
retrieval ratio (arm top-1 / base top-1) near 1 means the model still maps the forget language onto
the pivot language as well as before, whatever its output says.
"""

from __future__ import annotations

from mmie.core.artifacts import Artifact
from mmie.metrics.depth import retrieval_ratio
from mmie.report.html import artifact_png, figure_png, fit_scale, img_tag, table


def _interval(cell: dict) -> str:
    if cell.get("value") is None:
        return f"missing ({cell.get('missing', 'not recorded')})"
    if "low" in cell and "high" in cell:
        return f"{cell['value']:.3g} [{cell['low']:.3g}, {cell['high']:.3g}]"
    return f"{cell['value']:.3g} (no interval: {cell.get('missing_interval', 'not recorded')})"


def _value(curves: dict, run: str, metric: str, step: str) -> object:
    return curves.get(run, {}).get(metric, {}).get(step, "-")


def relearn_rows(art: Artifact) -> list[list]:
    m = art.metrics
    curves, rows = m.get("curves", {}), []
    for metric, by_step in m.get("recovery", {}).items():
        for step, cell in sorted(by_step.items(), key=lambda kv: int(kv[0])):
            rows.append([m.get("arm_name", "?"), metric, int(step),
                         _value(curves, "arm", metric, step), _value(curves, "base", metric, "0"),
                         _interval(cell)])
    return rows


def _recovery_plot(arts: list[Artifact]) -> bytes:
    metrics = sorted({k for a in arts for k in a.metrics.get("recovery", {})})

    def draw(figure):
        fig = figure(figsize=(4.5 * max(1, len(metrics)), 3.2), layout="constrained")
        for ax, metric in zip(fig.subplots(1, max(1, len(metrics)), squeeze=False)[0], metrics):
            values = []
            for art in arts:
                cells = art.metrics.get("recovery", {}).get(metric, {})
                pts = sorted((int(s), c) for s, c in cells.items() if c.get("value") is not None)
                if not pts:
                    continue
                xs, ys = [s for s, _ in pts], [c["value"] for _, c in pts]
                line = ax.plot(xs, ys, marker="o", label=art.metrics.get("arm_name", "?"))[0]
                if all("low" in c for _, c in pts):
                    ax.fill_between(xs, [c["low"] for _, c in pts], [c["high"] for _, c in pts],
                                    color=line.get_color(), alpha=0.15)
                values += ys
            ax.axhline(1.0, color="grey", linestyle=":", label="base level")
            ax.axhline(0.0, color="grey", linewidth=0.5)
            fit_scale(ax, values)
            ax.set(title=f"recovery fraction ({metric})", xlabel="attack step")
            ax.legend(fontsize=7)
        return fig

    return figure_png(draw)


def comprehension_rows(art: Artifact) -> list[list]:
    m = art.metrics
    base = m.get("base", {}).get("retrieval", {})
    arm = m.get("arm", {}).get("retrieval", {})
    change, rows = m.get("change_top1", {}), []
    for lang, by_block in base.items():
        for block, cell in sorted(by_block.items(), key=lambda kv: int(kv[0])):
            mine = arm.get(lang, {}).get(block)
            ratio = retrieval_ratio(mine["top1"], cell["top1"]) if mine else None
            rows.append([m.get("arm_name", "base"), lang + (" (forget)" if lang == m.get(
                "forget") else ""), int(block), cell["top1"], "-" if not mine else mine["top1"],
                "-" if ratio is None else f"{ratio:.3g}",
                _interval(change[lang][block]) if block in change.get(lang, {}) else "-",
                f"{cell.get('chance_top1', float('nan')):.3g}"])
    return rows


def _rate(cell: dict | None) -> str:
    if not cell:
        return "-"
    return f"{cell['x']}/{cell['n']} [{cell['low']:.2f}, {cell['high']:.2f}]"


def steering_rows(art: Artifact) -> list[list]:
    m = art.metrics
    return [[m.get("arm_name", "base"), "unsteered" if run == "0" else run, _rate(cell),
             _rate(m.get("arm", {}).get(run)),
             _interval(m["recovery"][run]) if run in m.get("recovery", {}) else "-"]
            for run, cell in m.get("base", {}).items()]


def _steering_part(arts: list[Artifact]) -> list[str]:
    if not arts:
        return []
    return ["<h3>Steering: does one direction bring the language back?</h3>",
            "<p>A difference-of-means direction (forget minus replacement language, training "
            "texts) added at a block (run = block x scale) while held-out forget prompts are "
            "continued. Recovery = (arm steered - arm unsteered) / (base unsteered - arm "
            "unsteered), 1 = the base model's rate.</p>",
            table(["arm", "run", "base forget rate [95% CI]", "arm forget rate [95% CI]",
                   "arm recovery [interval]"], [r for a in arts for r in steering_rows(a)])]


def section_depth(arts: list[Artifact]) -> str:
    relearn = [a for a in arts if a.kind == "relearn"]
    comp = [a for a in arts if a.kind == "comprehension"]
    parts = _steering_part([a for a in arts if a.kind == "steering"])
    if relearn:
        kept = "; ".join(f"{a.metrics.get('arm_name', '?')}: "
                         f"{', '.join(a.metrics.get('kept_during_attack', [])) or 'none'}"
                         for a in relearn)
        parts += ["<h3>Relearning attack: how much of the removal comes back</h3>",
                  "<p>Recovery fraction = (arm before - arm after k steps) / (arm before - "
                  f"base), 0 = nothing back, 1 = base level. Kept applied during the attack: "
                  f"{kept}.</p>",
                  table(["arm", "metric", "attack step", "arm value", "base value (step 0)",
                         "recovery fraction [interval]"],
                        [r for a in relearn for r in relearn_rows(a)]),
                  img_tag(_recovery_plot(relearn), "recovery curves")]
    if comp:
        parts += ["<h3>Comprehension: parallel-sentence retrieval</h3>",
                  "<p>Top-1 retrieval of the aligned pivot sentence from pooled hidden states; "
                  "ratio = arm / base. Removal should push the forget language toward chance "
                  "while the controls hold.</p>",
                  table(["arm", "language", "block", "base top-1", "arm top-1", "ratio",
                         "change (arm - base) [interval]", "chance"],
                        [r for a in comp for r in comprehension_rows(a)]),
                  *(artifact_png(a, "retrieval.png") for a in comp)]
    return "".join(parts)
