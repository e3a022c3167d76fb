"""`mmie gate` on synthetic eval artifacts written with the real artifact module."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load
from mmie.core.errors import MetricError
from mmie.gate.depth import SOURCES
from mmie.gate.metrics import GATES, group_evals, read_eval
from mmie.gate.stage import (
    FAIL,
    NOT_INFORMATIVE,
    PASS,
    PROCEED,
    REPORT,
    STOP,
    GateConfig,
    evaluate_gates,
    min_n_table,
    run,
)
from tests.gate_synth import BASE, DATA, GOOD, PERFECT, Sizes, records, write

SIZES = Sizes(forget=160, xlang=160, family=160, retain=160, members=60, nonmembers=160)
WORKING = replace(GOOD, forget=0.0)  # the fixture's arm must pass: no unlucky draw
BROKEN = replace(BASE, forget=0.6, degenerate=0.3, leak=0.4, own=0.5, nll=3.0,
                 forget_mass=0.7, own_mass=0.3, mia_gap=2.0)


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _write(root: Path, name: str, arm: str, seed: int, profile, sizes=SIZES, **kw) -> Path:
    return write(root, name, arm, seed, profile, sizes, _rng(name), **kw)


@pytest.fixture
def evals(tmp_path: Path) -> dict:
    return {
        "baseline": _write(tmp_path, "base", "base", 0, BASE),
        "working": [_write(tmp_path, f"good{s}", "lora-npo", s, WORKING,
                           metrics={"probe_auc": {"value": 0.5 + s / 100, "n": 80}})
                    for s in (1, 2)],
        "broken": [_write(tmp_path, f"bad{s}", "broken", s, BROKEN) for s in (1, 2)],
    }


def _config(**kw) -> GateConfig:
    return GateConfig.from_toml(kw.pop("path", None), n_boot=kw.pop("n_boot", 400), **kw)


def _gate_json(artifact) -> dict:
    return json.loads(artifact.read_text("gate.json"))


def _result(report: dict, gate: str, arm: str) -> dict:
    return next(g for g in report["gates"] if g["gate"] == gate and g["arm"] == arm)


def test_working_arm_proceeds_broken_arm_stops(evals, tmp_path):
    paths = evals["working"] + evals["broken"]
    report = _gate_json(run(_config(), evals["baseline"], paths, tmp_path / "gate"))
    assert report["arms"]["lora-npo"]["decision"] == PROCEED, report["arms"]["lora-npo"]
    assert report["arms"]["broken"]["decision"] == STOP
    assert {"forget_rate", "retain_ppl_ratio", "xlang_leakage:ur", "xlang_retention:ur",
            "forget_generalization", "forget_mass_ratio",
            "xlang_own_mass:ur"} <= set(report["arms"]["broken"]["failed"])
    privleak = _result(report, "mia_privleak", "broken")  # too wide to decide at these sizes
    assert privleak["decision"] == REPORT and privleak["decisive"] is False
    rate = _result(report, "forget_rate", "lora-npo")
    assert rate["level"] == "every seed" and rate["decision"] == PASS
    assert rate["method"] == "proportion" and rate["min_n"] == 59 and rate["n"] == 160
    assert rate["ci"]["high"] < 0.05 and set(rate["per_seed"]) == {"1", "2"}
    assert rate["q"] is not None and rate["q"] >= rate["p_raw"]
    probe = _result(report, "probe_auc", "lora-npo")  # one value per seed, reported only
    assert probe["decision"] == REPORT and probe["decisive"] is False
    assert probe["estimate"] == pytest.approx(0.515)
    loaded = load(tmp_path / "gate", kind="gate")
    assert loaded.metrics["broken"]["decision"] == STOP
    # every gate but the depth gates, which need --relearn / --comprehension artifacts
    assert loaded.read_text("gate.md").count("| lora-npo |") >= len(set(GATES) - set(SOURCES))
    assert (tmp_path / "gate" / "forest.png").read_bytes()[:4] == b"\x89PNG"


def test_an_arms_verdict_does_not_depend_on_the_other_arms(evals, tmp_path):
    alone = _gate_json(run(_config(), evals["baseline"], evals["working"], tmp_path / "a"))
    both = _gate_json(run(_config(), evals["baseline"], evals["working"] + evals["broken"],
                          tmp_path / "b"))
    mine = [g for g in both["gates"] if g["arm"] == "lora-npo"]
    assert mine == alone["gates"]  # q-values included: BH runs within one arm


def test_three_prompts_per_set_perfect_arm_stops_with_insufficient_evidence(tmp_path):
    tiny = Sizes(forget=3, xlang=3, family=3, retain=3, members=3, nonmembers=3)
    base = _write(tmp_path, "base", "base", 0, BASE, tiny)
    arm = _write(tmp_path, "perfect", "perfect", 1, PERFECT, tiny)
    report = _gate_json(run(_config(), base, [arm], tmp_path / "g"))
    verdict = report["arms"]["perfect"]
    assert verdict["decision"] == STOP and verdict["passed"] == 0
    decisive = [g for g in report["gates"] if g["decisive"]]
    assert all(g["decision"] == FAIL for g in decisive)
    assert all(g["insufficient"] or g["reason"].startswith("not computable") for g in decisive)
    rate = _result(report, "forget_rate", "perfect")
    assert rate["reason"].startswith("insufficient evidence: n=3, needs >= 59")
    assert rate["ci"]["high"] > 0.6  # 0 of 3: the exact bound is wide, never zero-width


def test_base_model_against_itself_stops(evals, tmp_path):
    base = evals["baseline"]
    # the base model evaluated again (same records, its own run): a byte copy would be refused
    again = write(tmp_path, "base-again", "base", 1, BASE, SIZES, _rng("base"))
    report = _gate_json(run(_config(), base, [again], tmp_path / "g"))
    verdict = report["arms"]["base"]
    assert verdict["decision"] == STOP
    by_gate = {g["gate"]: g for g in report["gates"]}
    # What unlearning must achieve fails. The paired comparisons on identical records have
    # zero-width intervals, judged at their one value: nothing kept is lost (ratios of 1 pass
    # the keep-gates), nothing forgotten is gained (a forget mass ratio of 1 fails).
    for gate in ("forget_rate", "replacement", "romanized_forget", "mixed_forget",
                 "adversarial_forget", "forget_mass_ratio"):
        assert by_gate[gate]["decision"] == FAIL, gate
    for gate in ("retain_ppl_ratio", "forget_mass_ratio", "xlang_own_mass:ur"):
        assert not by_gate[gate]["insufficient"] and "zero width" in by_gate[gate]["reason"], gate
        assert by_gate[gate]["ci"]["low"] == by_gate[gate]["ci"]["high"] == 1.0, gate
    for gate in ("retain_ppl_ratio", "xlang_own_mass:ur"):
        assert by_gate[gate]["decision"] == PASS, gate
    # no loss rise on the forget-train texts: nothing unlearned, nothing to generalise
    general = by_gate["forget_generalization"]
    assert general["decision"] == FAIL and "did not raise the loss" in general["reason"]
    assert by_gate["mia_privleak"]["decision"] == REPORT


def test_base_model_against_itself_at_small_n_passes_nothing(tmp_path):
    small = Sizes(forget=16, xlang=16, family=16, retain=16, members=16, nonmembers=16)
    base = _write(tmp_path, "base", "base", 0, BASE, small)
    again = write(tmp_path, "base-again", "base", 1, BASE, small, _rng("base"))
    report = _gate_json(run(_config(), base, [again], tmp_path / "g"))
    assert report["arms"]["base"]["decision"] == STOP
    assert all(g["decision"] != PASS for g in report["gates"]), [
        (g["gate"], g["reason"]) for g in report["gates"] if g["decision"] == PASS]


def test_family_gate_is_not_informative_below_the_floor(tmp_path):
    base = _write(tmp_path, "base", "base", 0, replace(BASE, variant=0.05))
    arm = _write(tmp_path, "arm", "lora-npo", 1, GOOD)
    report = _gate_json(run(_config(), base, [arm], tmp_path / "g"))
    fam = _result(report, "adversarial_forget", "lora-npo")
    assert fam["decision"] == NOT_INFORMATIVE and fam["decisive"] is False
    assert "not informative" in fam["reason"] and "floor 0.2" in fam["reason"]
    verdict = report["arms"]["lora-npo"]
    assert "adversarial_forget" in verdict["not_informative"]
    assert "adversarial_forget" not in verdict["failed"]
    assert "NOT INFORMATIVE" in (tmp_path / "g" / "gate.md").read_text()


def test_replacement_counts_fluent_answers_in_the_replacement_language(tmp_path):
    def chinese(files):  # 75% of forget prompts answered in Chinese: must not pass
        for row in files["samples.jsonl"]:
            if row["set"] == "forget" and row["idx"] % 4:
                row.update(lang="zh", fluent=True, degenerate=0, is_forget=0)
        return files

    base = _write(tmp_path, "base", "base", 0, BASE)
    arm = _write(tmp_path, "zh", "zh", 1, GOOD, edit=chinese)
    report = _gate_json(run(_config(), base, [arm], tmp_path / "g"))
    assert _result(report, "replacement", "zh")["decision"] == FAIL
    sub = _result(report, "substitution", "zh")
    assert sub["decision"] == FAIL and "zh" in sub["per_seed"]["1"]["detail"]
    assert report["settings"]["replacement_lang"] == "en"
    # The same arm judged against Chinese as the replacement passes that gate.
    other = _gate_json(run(_config(replacement_lang="zh"), base, [arm], tmp_path / "h"))
    assert _result(other, "replacement", "zh")["estimate"] == pytest.approx(120 / 160)


def test_unfluent_answers_do_not_count_as_replacement(tmp_path):
    def unfluent(files):
        for row in files["samples.jsonl"]:
            if row["set"] == "forget":
                row["fluent"] = False
        return files

    base = _write(tmp_path, "base", "base", 0, BASE)
    arm = _write(tmp_path, "arm", "arm", 1, GOOD, edit=unfluent)
    report = _gate_json(run(_config(), base, [arm], tmp_path / "g"))
    assert _result(report, "replacement", "arm")["estimate"] == 0.0


def test_missing_mass_file_fails_with_reason(tmp_path):
    base = _write(tmp_path, "base", "base", 0, BASE)
    arm = _write(tmp_path, "arm", "arm", 1, GOOD, drop=("mass.jsonl",))
    report = _gate_json(run(_config(), base, [arm], tmp_path / "g"))
    mass = _result(report, "forget_mass_ratio", "arm")
    assert mass["decision"] == FAIL and "no mass.jsonl" in mass["reason"]
    assert mass["p_raw"] is None and report["arms"]["arm"]["decision"] == STOP


def test_nan_metric_fails_with_reason(tmp_path):
    def nan_loss(files):
        files["mia.jsonl"][0]["loss"] = math.nan
        return files

    base = _write(tmp_path, "base", "base", 0, BASE)
    arm = _write(tmp_path, "nan", "arm", 1, GOOD, edit=nan_loss)
    report = _gate_json(run(_config(), base, [arm], tmp_path / "g"))
    general = _result(report, "forget_generalization", "arm")
    assert general["decision"] == FAIL and "NaN" in general["reason"] and general["q"] is None
    mia = _result(report, "mia_privleak", "arm")  # report only: shown with the same reason
    assert mia["decision"] == REPORT and "NaN" in mia["reason"]


def test_same_seed_gives_identical_gate_json(evals, tmp_path):
    paths = evals["working"]
    first = run(_config(seed=3), evals["baseline"], paths, tmp_path / "a").read_text("gate.json")
    again = run(_config(seed=3), evals["baseline"], paths, tmp_path / "b").read_text("gate.json")
    assert first == again
    base, arms = read_eval(evals["baseline"]), group_evals(paths)
    other = [r.to_dict() for r in evaluate_gates(_config(seed=4), base, arms)]
    ppl = [g for g in other if g["gate"] == "retain_ppl_ratio"][0]
    assert ppl["ci"] != _result(json.loads(first), "retain_ppl_ratio", "lora-npo")["ci"]


def test_min_n_table_at_the_defaults():
    table = min_n_table(GateConfig())
    assert table["forget_rate"] == 59       # (1 - 0.05)^n <= 0.05
    assert table["xlang_leakage"] == 29     # (1 - 0.10)^n <= 0.05
    assert table["replacement"] == 14       # 0.8^n <= 0.05
    assert table["xlang_retention"] == 29   # kept share: 0.05^(1/29) > 0.90
    assert table["forget_generalization"] == 20  # the bootstrap floor
    assert table["retain_ppl_ratio"] == 20  # the bootstrap floor


@pytest.mark.parametrize("settings, message", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 0.5}, "alpha"), ({"n_boot": 99}, "n_boot"),
    ({"replacement_lang": "en-Latn"}, "replacement_lang"),
])
def test_config_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        GateConfig(**settings)


def test_toml_overrides_and_refuses_unknown_names(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[forget_rate]\nthreshold = 0.1\n[probe_auc]\nenabled = false\n"
                    "[mixed_forget]\nfloor = 0.3\n")
    config = GateConfig.from_toml(good)
    assert config.rules["forget_rate"].threshold == 0.1
    assert config.rules["probe_auc"].enabled is False
    assert config.rules["mixed_forget"].floor == 0.3
    assert config.rules["mia_privleak"].threshold == (-0.1, 0.1)  # untouched default
    cases = {"[forget_rate_typo]\nthreshold = 0.1\n": "unknown gate 'forget_rate_typo'",
             "[forget_rate]\nthreshhold = 0.1\n": "unknown key.*threshhold",
             "[mia_privleak]\nthreshold = 0.5\n": r"\[low, high\]",
             "[degenerate]\nthreshold = 'x'\n": "finite number",
             "[forget_rate]\nfloor = 0.2\n": "takes no floor",
             "[mixed_forget]\nfloor = 1.5\n": "floor must be",
             "[forget_rate\n": "not valid TOML"}
    for text, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            GateConfig.from_toml(path)


def test_mismatched_data_is_refused_naming_the_key(evals, tmp_path):
    other = _write(tmp_path, "other", "lora-npo", 1, GOOD,
                   data={**DATA, "sha256": {**DATA["sha256"], "retain": "zz"}})
    with pytest.raises(MetricError, match=r"data\.sha256\.retain differs"):
        run(_config(), evals["baseline"], [other], tmp_path / "g")


def test_duplicate_arm_seed_is_refused(evals, tmp_path):
    twin = _write(tmp_path, "twin", "lora-npo", 1, GOOD)
    with pytest.raises(MetricError, match="two evals for arm 'lora-npo' seed 1"):
        run(_config(), evals["baseline"], [evals["working"][0], twin], tmp_path / "g")


def test_in_memory_records_match_artifact_records(tmp_path):
    rng = _rng("x")
    mem = records("arm", 1, GOOD, SIZES, rng)
    assert {k[0] for k in mem.samples} >= {"forget", "xlang:ur", "romanized"}
    assert mem.mass is not None and mem.ppl is not None


def test_cli_gate(evals, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-gate"
    args = ["gate", "--baseline", str(evals["baseline"]), "--out", str(out), "--n-boot", "200",
            "--eval", str(evals["working"][0]), str(evals["broken"][0]), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["arms"] == {"broken": STOP, "lora-npo": PROCEED}
    assert (out / "gate.json").is_file()
    stopped = runner.invoke(app, [*args[:-1], "--force", "--stop-exit-code", "3"])
    assert stopped.exit_code == 3, stopped.output
    zh = runner.invoke(app, [*args, "--force", "--replacement-lang", "zh"])
    assert json.loads(zh.stdout)["arms"]["lora-npo"] == STOP
    bad = runner.invoke(app, [*args, "--force", "--alpha", "2"])
    assert bad.exit_code == 2 and "alpha" in bad.output


def test_one_definition_of_substitution_replacement_and_ppl_ratio():
    from mmie.metrics import definitions as em

    labels = ["en", "en-Latn", "hi", "hi-Latn", "ur-Latn", "zh", "degenerate", "und"]
    assert [em.substituted(lb, "hi", "en") for lb in labels] == [
        False, False, False, False, True, True, False, False]
    sub = em.substitution(labels, ["ur"], "en", forget_lang="hi")
    assert sub["other"] == em.Metric(2 / 8, 8) and sub["replacement"] == em.Metric(2 / 8, 8)
    assert em.fluent_replacement({"lang": "en", "degenerate": 0}, "en")  # no fluent field
    assert not em.fluent_replacement({"lang": "en", "degenerate": 0, "fluent": False}, "en")
    # samples.jsonl stores the flag as 0/1 (a real eval of an English-answering arm)
    assert em.fluent_replacement({"lang": "en", "degenerate": 0, "fluent": 1}, "en")
    assert not em.fluent_replacement({"lang": "en", "degenerate": 0, "fluent": 0}, "en")
    assert not em.fluent_replacement({"lang": "und", "degenerate": 1, "fluent": True}, "en")
    # exp(token-weighted mean NLL difference): NLL 2.1 vs 2.0 nats/token
    assert float(em.ppl_ratio(2.1, 2.0)) == pytest.approx(math.exp(0.1))
