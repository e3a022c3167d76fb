"""The report's opening: the answer per arm, then the same forget prompts answered by each arm.

One row per arm: the gate's decision, the forget-language rate on forget prompts, each protected
language's own-language rate (and its share of the base model's), the perplexity ratio on the
retained language, and what replaced the forget language (the language distribution of the
forget-prompt generations). Rates pool every seed's samples of an arm; the gate's verdict is the
one that decides (every seed must pass, docs/gates.md), these numbers only describe.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from mmie.core.artifacts import Artifact
from mmie.metrics.definitions import record_label
from mmie.report.html import Raw, badge, esc, lang_name, table

N_EXAMPLES = 4
SNIPPET = 160


@dataclass
class Arm:
    """The eval artifacts of one arm (every seed) and their samples, read once."""

    name: str
    evals: list[Artifact]
    samples: list[dict]

    def of_set(self, set_name: str) -> list[dict]:
        return [r for r in self.samples if r.get("set") == set_name]


def _samples(art: Artifact) -> list[dict]:
    return art.read_jsonl("samples.jsonl") if (art.path / "samples.jsonl").is_file() else []


def group_arms(evals: Sequence[Artifact]) -> list[Arm]:
    """Arms in display order: the base model first, then by name."""
    grouped: dict[str, list[Artifact]] = defaultdict(list)
    for art in evals:
        grouped[str(art.config.get("arm", art.path.name))].append(art)
    order = sorted(grouped, key=lambda a: (a != "base", a))
    return [Arm(a, sorted(grouped[a], key=lambda e: str(e.config.get("seed"))),
                [r for e in sorted(grouped[a], key=lambda e: str(e.config.get("seed")))
                 for r in _samples(e)]) for a in order]


def share(flags: Sequence[object]) -> tuple[float, int] | None:
    kept = [float(f) for f in flags if f is not None]
    return (sum(kept) / len(kept), len(kept)) if kept else None


def _rate_text(got: tuple[float, int] | None, base: tuple[float, int] | None = None) -> str:
    if got is None:
        return "missing"
    text = f"{got[0]:.2f} (n={got[1]})"
    if base is not None and base[0] > 0:
        text += f", {100 * got[0] / base[0]:.0f}% of base"
    return text


def _own_text(arm: Arm, base: Arm | None, set_name: str) -> str:
    """The own-language rate and, against the base model, the kept share the
    ``xlang_retention`` gate judges: of the prompts the base answered in their own language,
    how many the arm still answers in it (pooled over the arm's seeds)."""
    text = _rate_text(share(r.get("is_own") for r in arm.of_set(set_name)))
    if base is None or text == "missing":
        return text
    theirs = {r.get("idx"): r.get("is_own") for r in base.of_set(set_name)}
    pairs = [(r.get("is_own"), theirs.get(r.get("idx"))) for r in arm.of_set(set_name)]
    own_before = [a for a, b in pairs if b and a is not None]
    if not own_before:
        return text
    return f"{text}, kept {int(sum(map(bool, own_before)))} of {len(own_before)}"


def _metric(art: Artifact, name: str) -> float | None:
    entry = art.metrics.get(name)
    value = entry.get("value") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def ppl_ratio(arm: Arm, base: Arm | None) -> str:
    """Retained-language perplexity, arm / base model, averaged over the arm's seeds."""
    base_ppl = [v for e in (base.evals if base else []) if (v := _metric(e, "retain_ppl"))]
    ratios = []
    for art in arm.evals:
        own = _metric(art, "retain_ppl")
        ratio = own / base_ppl[0] if own and base_ppl else _metric(art, "retain_ppl_ratio")
        if ratio is not None:
            ratios.append(ratio)
    return f"{sum(ratios) / len(ratios):.4g}" if ratios else "missing"


def replaced(arm: Arm, top: int = 4) -> str:
    """Language distribution of the forget-prompt generations, most frequent first."""
    labels = Counter(record_label(r) for r in arm.of_set("forget") if "lang" in r)
    total = sum(labels.values())
    if not total:
        return "missing"
    parts = [f"{lab} {100 * k / total:.0f}%" for lab, k in labels.most_common(top)]
    rest = total - sum(k for _, k in labels.most_common(top))
    return " · ".join(parts + ([f"other {100 * rest / total:.0f}%"] if rest else []))


def latest_gate(gates: Sequence[Artifact]) -> dict:
    """gate.json of the newest gate artifact (``{}`` when there is none)."""
    if not gates:
        return {}
    art = max(gates, key=lambda g: g.manifest.get("created_at", ""))
    if (art.path / "gate.json").is_file():
        return json.loads(art.read_text("gate.json"))
    return {"arms": {a: v for a, v in art.metrics.items() if isinstance(v, dict)}, "gates": []}


def _decision(arm: str, report: dict) -> Raw | str:
    verdict = report.get("arms", {}).get(arm)
    if arm == "base":
        return "baseline"
    if verdict is None:
        return "not gated"
    passed = f" {verdict.get('passed', '?')}/{verdict.get('n', '?')} decisive gates passed"
    return Raw(badge(verdict["decision"]) + esc(passed))


def _protected(arms: Sequence[Arm]) -> list[str]:
    return sorted({r["set"] for a in arms for r in a.samples
                   if str(r.get("set", "")).startswith("xlang:")})


def headline(arms: Sequence[Arm], report: dict) -> str:
    """The answer table, one row per arm."""
    if not arms:
        return "<p>No eval artifacts: nothing to summarise.</p>"
    cfg = arms[0].evals[0].config
    forget = lang_name(str(cfg.get("forget_lang", "forget")))
    retain = lang_name(str(cfg.get("retain_lang", "retain")))
    xsets, base = _protected(arms), next((a for a in arms if a.name == "base"), None)
    header = ["arm", "decision", f"{forget} rate on {forget} prompts",
              *(f"{lang_name(s.removeprefix('xlang:'))} own rate" for s in xsets),
              f"{retain} perplexity ratio", f"what replaced {forget}"]
    depth = bool(report.get("depth"))
    header += ["depth: relearn recovery, retrieval ratio"] if depth else []
    rows = []
    for arm in arms:
        own = [_own_text(arm, None if arm is base else base, s) for s in xsets]
        rows.append([arm.name, _decision(arm.name, report),
                     _rate_text(share(r.get("is_forget") for r in arm.of_set("forget"))),
                     *own, "1 (reference)" if arm is base else ppl_ratio(arm, base),
                     replaced(arm), *([depth_text(arm.name, report)] if depth else [])])
    return table(header, rows, cls="answer")


CUT = "insufficient evidence: "


def depth_text(arm: str, report: dict) -> str:
    """The depth gates' estimates with their intervals (gate.json), or why they are absent."""
    parts = []
    for gate in ("relearn_recovery", "retrieval_ratio"):
        g = next((g for g in report.get("gates", []) if g["arm"] == arm and g["gate"] == gate),
                 None)
        if g is None or g.get("estimate") is None:
            continue
        ci = g.get("ci") or {}
        parts.append(f"{gate.split('_')[0]} {g['estimate']:.2f}"
                     + (f" [{ci['low']:.2f}, {ci['high']:.2f}]" if ci else ""))
    return "; ".join(parts) or "-"


def _first_clause(reason: str) -> str:
    return reason.split(";")[0].strip()


def gate_notes(report: dict) -> str:
    """Insufficient evidence and not-informative gates, said plainly; arms with the same
    notes share one line."""
    notes: dict[str, list[str]] = defaultdict(list)
    for arm in report.get("arms", {}):
        mine = [g for g in report.get("gates", []) if g.get("arm") == arm]
        short = [f"{g['gate']} ({_first_clause(g.get('reason', '')).removeprefix(CUT)})"
                 for g in mine if g.get("insufficient")]
        idle = [g["gate"] for g in mine if g.get("decision") == "NOT INFORMATIVE"]
        if short:
            notes["insufficient evidence, too few samples to pass at this alpha: "
                  + ", ".join(short)].append(arm)
        if idle:
            notes["not informative (the base model's own rate is below the floor, or too low "
                  "for even a perfect arm to pass at this n; shown, not decisive): "
                  + ", ".join(idle)].append(arm)
    items = [f"<li><b>{esc(', '.join(arms))}</b>: {esc(text)}</li>"
             for text, arms in notes.items()]
    return f"<ul class='notes'>{''.join(items)}</ul>" if items else ""


def _snippet(record: dict | None) -> Raw:
    if record is None:
        return Raw("<i>not generated</i>")
    text = str(record.get("generation", ""))
    text = text if len(text) <= SNIPPET else text[:SNIPPET] + "…"
    label = record_label(record) if "lang" in record else "no language recorded"
    return Raw(f"{esc(text)} <span class='lab'>[{esc(label)}]</span>")


def side_by_side(arms: Sequence[Arm], n: int = N_EXAMPLES) -> str:
    """The first ``n`` forget prompts every arm answered, one column per arm (first seed)."""
    first = {a.name: {r["idx"]: r for r in _samples(a.evals[0]) if r.get("set") == "forget"}
             for a in arms}
    shared = sorted(set.intersection(*(set(f) for f in first.values()))) if first else []
    if not shared:
        return "<p>No forget prompt was answered by every arm.</p>"
    rows = [[first[arms[0].name][i].get("prompt", ""),
             *(_snippet(first[a.name].get(i)) for a in arms)] for i in shared[:n]]
    return table(["forget prompt", *(a.name for a in arms)], rows, cls="examples")
