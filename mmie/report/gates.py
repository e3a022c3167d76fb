"""The report's gate section: arm verdicts and every gate of gate.json, decisions in words."""

from __future__ import annotations

import json

from mmie.core.artifacts import Artifact
from mmie.report.html import Raw, artifact_png, badge, esc, table


def _num(value: object) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def threshold_text(gate: dict) -> str:
    t = gate.get("threshold")
    if isinstance(t, (list, tuple)):
        return f"in [{t[0]:g}, {t[1]:g}]"
    return f"{'>' if gate.get('direction') == 'greater' else '<'} {t:g}" if t is not None else "-"


def _decision_cell(g: dict) -> Raw:
    """The decision, plus "insufficient evidence" spelled out when that is why it FAILed."""
    extra = " (insufficient evidence)" if g.get("insufficient") else ""
    return Raw(badge(g.get("decision", "?")) + esc(extra))


def _gate_row(g: dict) -> list:
    ci = g.get("ci")
    return [g.get("arm"), g.get("gate"), _num(g.get("estimate")),
            "-" if not ci else f"[{ci['low']:.4g}, {ci['high']:.4g}]", threshold_text(g),
            _num(g.get("n")), _num(g.get("min_n")), _num(g.get("q")), _decision_cell(g),
            g.get("reason", "")]


def _arm_rows(report: dict) -> list[list]:
    return [[arm, Raw(badge(v.get("decision", "?"))), f"{v.get('passed', '?')}/{v.get('n', '?')}",
             ", ".join(v.get("failed", [])) or "-", ", ".join(v.get("insufficient", [])) or "-",
             ", ".join(v.get("not_informative", [])) or "-"]
            for arm, v in report.get("arms", {}).items()]


def gate_section(art: Artifact) -> str:
    """One gate artifact: the rule, arm verdicts, the gate table, the forest plot."""
    if not (art.path / "gate.json").is_file():
        rows = [[arm, Raw(badge(v["decision"])), v.get("passed", ""), v.get("failed", "")]
                for arm, v in art.metrics.items() if isinstance(v, dict) and "decision" in v]
        return (f"<p>{esc(art.path)} (no gate.json)</p>"
                + table(["arm", "decision", "passed", "failed"], rows)
                + artifact_png(art, "forest.png"))
    report = json.loads(art.read_text("gate.json"))
    s = report.get("settings", {})
    parts = [f"<p>{esc(art.path)}: alpha {esc(s.get('alpha'))}, {esc(s.get('n_boot'))} "
             f"bootstrap resamples. {esc(report.get('rule', ''))}</p>",
             table(["arm", "decision", "decisive gates passed", "failed",
                    "insufficient evidence", "not informative (not decisive)"],
                   _arm_rows(report)),
             table(["arm", "gate", "estimate", "interval (1-2 alpha)", "threshold", "n",
                    "min n", "q (BH, this arm)", "decision", "reason"],
                   [_gate_row(g) for g in report.get("gates", [])], cls="gates"),
             artifact_png(art, "forest.png")]
    return "".join(parts)
