"""Depth gates of `mmie gate` (relearn_recovery, retrieval_ratio) and the report's depth
section, on synthetic relearn / comprehension artifacts with hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import save
from mmie.core.errors import MetricError
from mmie.gate.depth import DepthSettings
from mmie.gate.stage import FAIL, PASS, REPORT, GateConfig, Rule, default_rules, run
from mmie.report.stage import ReportConfig
from mmie.report.stage import run as report
from tests.gate_synth import BASE, GOOD, Sizes, write

SIZES = Sizes(forget=60, xlang=60, family=60, retain=60, members=30, nonmembers=60)
N = 30  # held-out texts / aligned sentences


def _evals(root: Path) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(0)
    base = write(root, "eval-base", "base", 0, BASE, SIZES, rng)
    return base, [write(root, f"eval-{a}", a, 1, GOOD, SIZES, rng) for a in ("lora-npo", "other")]


def _scores(recovered: float) -> list[dict]:
    """Per text i (10 tokens): base NLL sum 20 + i, arm before 40 + i, arm after 20 steps
    40 + i - recovered * 20 (+ 0.5 on odd i, so resamples differ); step 5 halfway."""
    rows = []
    for i in range(N):
        wobble = 0.5 * (i % 2)
        values = {("base", 0): 20 + i, ("arm", 0): 40 + i,
                  ("arm", 5): 40 + i - recovered * 10 + wobble,
                  ("arm", 20): 40 + i - recovered * 20 + wobble}
        rows += [{"run": run, "step": step, "set": "heldout", "idx": i, "nll_sum": v,
                  "n_tokens": 10, "mass_sum": None} for (run, step), v in values.items()]
    return rows


def _expected_recovery(recovered: float) -> float:
    before = sum(40 + i for i in range(N))
    after = sum(40 + i - recovered * 20 + 0.5 * (i % 2) for i in range(N))
    return (before - after) / (before - sum(20 + i for i in range(N)))


def _relearn(root: Path, arm: str = "lora-npo", recovered: float = 0.75) -> Path:
    rec = {"0": {"value": 0.0}, "5": {"value": recovered / 2, "low": 0.1, "high": 0.5},
           "20": {"value": recovered, "low": recovered - 0.1, "high": recovered + 0.1}}
    metrics = {"steps": [0, 5, 20], "metrics": ["nll"], "arm_name": arm,
               "missing": {"script_mass": "byte-level tokenizer"},
               "curves": {"arm": {"nll": {"0": 4.0, "5": 3.2, "20": 2.5}},
                          "base": {"nll": {"0": 2.0, "5": 1.9, "20": 1.8}}},
               "recovery": {"nll": rec}, "kept_during_attack": ["sae_gate"]}
    rows = "".join(json.dumps(r) + "\n" for r in _scores(recovered))
    return save(root / f"relearn-{arm}", "relearn", tensors={}, config={}, model=None,
                metrics=metrics, files={"scores.jsonl": rows}).path


def _comprehension(root: Path, arm: str = "lora-npo") -> Path:
    """Base top-1 on 'hi': 6/30 at block 1, 12/30 at block 2 (the best); the arm 3/30 at 2."""
    hits = {("base", 1): 6, ("base", 2): 12, ("arm", 1): 6, ("arm", 2): 3}
    rows = [{"condition": c, "lang": "hi", "layer": b, "idx": i, "rank": 1 if i < k else 2 + i}
            for (c, b), k in hits.items() for i in range(N)]
    cell = {str(b): {"top1": hits[("base", b)] / N, "chance_top1": 1 / N} for b in (1, 2)}
    arm_cell = {str(b): {"top1": hits[("arm", b)] / N, "chance_top1": 1 / N} for b in (1, 2)}
    metrics = {"layers": [1, 2], "n": N, "forget": "hi", "pivot": "en", "arm_name": arm,
               "base": {"retrieval": {"hi": cell}}, "arm": {"retrieval": {"hi": arm_cell}},
               "change_top1": {"hi": {"2": {"value": -0.3, "low": -0.45, "high": -0.15}}}}
    text = "".join(json.dumps(r) + "\n" for r in rows)
    return save(root / f"comp-{arm}", "comprehension", tensors={}, config={}, model=None,
                metrics=metrics, files={"ranks.jsonl": text}).path


def _gate(report: dict, gate: str, arm: str = "lora-npo") -> dict:
    return next(g for g in report["gates"] if g["gate"] == gate and g["arm"] == arm)


def _config(decisive: bool = False, **depth) -> GateConfig:
    rules = default_rules()
    if decisive:
        rules |= {name: Rule(rules[name].threshold) for name in ("relearn_recovery",
                                                                  "retrieval_ratio")}
    return GateConfig(n_boot=400, rules=rules, depth=DepthSettings(**depth))


def _run(tmp_path, config, **depth_paths) -> dict:
    base, evals = _evals(tmp_path)
    art = run(config, base, evals, tmp_path / "gate", **depth_paths)
    return json.loads(art.read_text("gate.json"))


def test_depth_gates_equal_hand_computations(tmp_path):
    report = _run(tmp_path, _config(), relearn=[_relearn(tmp_path)],
                  comprehension=[_comprehension(tmp_path)])
    rec = _gate(report, "relearn_recovery")
    assert rec["estimate"] == pytest.approx(_expected_recovery(0.75))
    assert rec["decision"] == REPORT and not rec["decisive"] and rec["n"] == N
    assert set(rec["per_seed"]) == {"relearn"}  # judged once per arm, not per seed
    ratio = _gate(report, "retrieval_ratio")  # block 2: the base model's best
    assert ratio["estimate"] == pytest.approx(3 / 12) and ratio["method"] == "proportion ratio"
    assert report["depth"]["lora-npo"]["comprehension"]["block"] == 2
    assert report["depth"]["lora-npo"]["relearn"] == {"path": str(tmp_path / "relearn-lora-npo"),
                                                      "step": 20, "metric": "nll"}
    other = _gate(report, "relearn_recovery", "other")  # no artifact for this arm
    assert other["decision"] == REPORT and "no relearn artifact for arm 'other'" in other["reason"]
    failed = {g for v in report["arms"].values() for g in v["failed"]}
    assert not failed & {"relearn_recovery", "retrieval_ratio"}  # report-only: no verdict


def test_depth_gates_decide_when_not_report_only(tmp_path):
    report = _run(tmp_path, _config(decisive=True, retrieval_block=1),
                  relearn=[_relearn(tmp_path, recovered=0.02)],
                  comprehension=[_comprehension(tmp_path)])
    rec = _gate(report, "relearn_recovery")
    assert rec["decision"] == PASS and rec["ci"]["high"] < 0.25
    ratio = _gate(report, "retrieval_ratio")  # block 1: arm 6 = base 6, nothing removed
    assert ratio["estimate"] == pytest.approx(1.0) and ratio["decision"] == FAIL
    assert "retrieval_ratio" in report["arms"]["lora-npo"]["failed"]
    assert "relearn_recovery" in report["arms"]["other"]["failed"]  # missing artifact: FAIL


def test_missing_step_and_metric_are_reasons(tmp_path):
    report = _run(tmp_path, _config(relearn_step=50), relearn=[_relearn(tmp_path)])
    assert "step 50 is not in the attack schedule [0, 5, 20]" in \
        _gate(report, "relearn_recovery")["reason"]
    assert not any(g["gate"] == "retrieval_ratio" for g in report["gates"])  # not given
    again = tmp_path / "again"
    report = _run(again, _config(relearn_metric="script_mass"), relearn=[_relearn(again)])
    assert "script_mass is missing (byte-level tokenizer)" in \
        _gate(report, "relearn_recovery")["reason"]


def test_depth_artifacts_are_tied_to_a_gated_arm(tmp_path):
    base, evals = _evals(tmp_path)
    with pytest.raises(MetricError, match="measured arm 'nobody', which no --eval has"):
        run(_config(), base, evals, tmp_path / "g1", relearn=[_relearn(tmp_path, "nobody")])
    twice = [_relearn(tmp_path), _relearn(tmp_path / "again")]
    with pytest.raises(MetricError, match="two relearn artifacts for arm 'lora-npo'"):
        run(_config(), base, evals, tmp_path / "g2", relearn=twice)
    with pytest.raises(ValueError, match="relearn step must be >= 1"):
        DepthSettings(relearn_step=0)


def test_gate_cli_depth_options_and_report_section(tmp_path):
    base, evals = _evals(tmp_path)
    relearn, comp = _relearn(tmp_path), _comprehension(tmp_path)
    args = ["gate", "--baseline", str(base), *(x for e in evals for x in ("--eval", str(e))),
            "--relearn", str(relearn), "--comprehension", str(comp), "--relearn-step", "5",
            "--n-boot", "200", "--out", str(tmp_path / "gate")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert report["settings"]["depth"]["relearn_step"] == 5
    step5 = (N * 0.75 * 10 - 0.5 * (N // 2)) / (N * 20)  # (before - after) / (before - base)
    assert _gate(report, "relearn_recovery")["estimate"] == pytest.approx(step5)
    assert _gate(report, "retrieval_ratio")["estimate"] == pytest.approx(0.25)
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "g2"),
                                   "--relearn-metric", "accuracy"])
    assert bad.exit_code == 2 and "relearn metric must be one of" in bad.output
    page = report_page(tmp_path)
    assert "Depth: is it gone or hidden?" in page and "sae_gate" in page
    assert "0.75 [0.65, 0.85]" in page  # recovery at step 20, as recorded
    assert "<td>0.25</td>" in page  # retrieval ratio at block 2: 0.1 / 0.4
    answer = page[page.index('<section id="answer">'):page.index("</section>")]
    assert "depth: relearn recovery, retrieval ratio" in answer and "retrieval 0.25 [" in answer


def report_page(tmp_path: Path) -> str:
    out = report(ReportConfig((str(tmp_path),), str(tmp_path / "r.html")))
    return out.read_text()
