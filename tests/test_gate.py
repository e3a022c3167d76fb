"""`mmie gate` on synthetic eval artifacts written with the real artifact module."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load, save
from mmie.core.errors import MetricError
from mmie.gate.metrics import GATES, group_evals, read_eval
from mmie.gate.stage import FAIL, PASS, PROCEED, REPORT, STOP, GateConfig, evaluate_gates, run

N = 100
DATA = {"sha256": {"forget": "aa", "retain": "bb", "xlang:ur": "cc"}, "n_prompts": N,
        "max_new_tokens": 32, "forget_lang": "hi", "replacement_lang": "en",
        "protected": ["ur", "pa", "bn"]}
WORKING = {"forget": 0.05, "leak": 0.0, "own": 0.95, "nll": 2.02, "fluency": 3.1,
           "degenerate": 0.02, "substitute": 0.0, "variant": 0.05, "mia_gap": 0.0}
BROKEN = {"forget": 0.9, "leak": 0.4, "own": 0.5, "nll": 3.0, "fluency": 5.0,
          "degenerate": 0.5, "substitute": 0.3, "variant": 0.8, "mia_gap": 2.0}
BASELINE = {"forget": 0.95, "leak": 0.0, "own": 0.95, "nll": 2.0, "fluency": 3.0,
            "degenerate": 0.0, "substitute": 0.0, "variant": 0.9, "mia_gap": 2.0}


def _flags(rng: np.random.Generator, share: float) -> list[int]:
    """N Bernoulli(share) draws, so seeds differ and intervals have width."""
    return (rng.random(N) < share).astype(int).tolist()


def _samples(p: dict, rng: np.random.Generator) -> list[dict]:
    rows = []
    forget, subst = _flags(rng, p["forget"]), _flags(rng, p["substitute"])
    for i, (hit, degenerate) in enumerate(zip(forget, _flags(rng, p["degenerate"]), strict=True)):
        lang = "hi" if hit else ("ur" if subst[i] else "en")
        rows.append({"set": "forget", "idx": i, "lang": lang, "is_forget": hit, "is_own": None,
                     "degenerate": degenerate, "fluency_nll": p["fluency"] + rng.normal(0, 0.2)})
    for i, (leak, own) in enumerate(zip(_flags(rng, p["leak"]), _flags(rng, p["own"]),
                                        strict=True)):
        rows.append({"set": "xlang:ur", "idx": i, "lang": "hi" if leak else "ur",
                     "is_forget": leak, "is_own": own, "degenerate": 0, "fluency_nll": None})
    for name in ("romanized", "mixed", "adversarial"):
        rows += [{"set": name, "idx": i, "lang": "hi" if hit else "en", "is_forget": hit,
                  "is_own": None, "degenerate": 0, "fluency_nll": None}
                 for i, hit in enumerate(_flags(rng, p["variant"]))]
    return rows


def _ppl(p: dict, rng: np.random.Generator) -> list[dict]:
    tokens = rng.integers(10, 30, size=N)
    return [{"set": "retain", "idx": i, "n_tokens": int(t),
             "nll_sum": float(t * (p["nll"] + rng.normal(0, 0.05)))} for i, t in enumerate(tokens)]


def _mia(p: dict, rng: np.random.Generator) -> list[dict]:
    # Each member shares its loss with one non-member: AUC is exactly 0.5 without a gap.
    losses = np.repeat(rng.normal(3.0, 1.0, size=150), 2)
    return [{"idx": i, "member": int(i % 2 == 0),
             "loss": float(loss - p["mia_gap"] * (i % 2 == 0)), "mink_pp": 0.0}
            for i, loss in enumerate(losses)]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_eval(root: Path, name: str, arm: str, seed: int, profile: dict, *, data=None,
              samples=None, extra_metrics=None) -> Path:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    files = {"samples.jsonl": _jsonl(samples if samples is not None else _samples(profile, rng)),
             "ppl.jsonl": _jsonl(_ppl(profile, rng)), "mia.jsonl": _jsonl(_mia(profile, rng))}
    config = {"arm": arm, "seed": seed, "data": data or DATA}
    save(root / name, "eval", tensors={}, config=config, model=None, files=files,
         metrics=extra_metrics or {})
    return root / name


@pytest.fixture
def evals(tmp_path: Path) -> dict:
    return {
        "baseline": make_eval(tmp_path, "base", "base", 0, BASELINE),
        "working": [make_eval(tmp_path, f"good{s}", "lora-npo", s, WORKING,
                              extra_metrics={"probe_auc": {"value": 0.5 + s / 100, "n": 80}})
                    for s in (1, 2)],
        "broken": [make_eval(tmp_path, f"bad{s}", "broken", s, BROKEN) for s in (1, 2)],
    }


def _config(**kw) -> GateConfig:
    return GateConfig.from_toml(None, n_boot=kw.pop("n_boot", 300), **kw)


def _gate_json(artifact) -> dict:
    return json.loads(artifact.read_text("gate.json"))


def _result(report: dict, gate: str, arm: str) -> dict:
    return next(g for g in report["gates"] if g["gate"] == gate and g["arm"] == arm)


def test_working_arm_proceeds_broken_arm_stops(evals, tmp_path):
    paths = evals["working"] + evals["broken"]
    artifact = run(_config(), evals["baseline"], paths, tmp_path / "gate")
    report = _gate_json(artifact)
    assert report["arms"]["lora-npo"]["decision"] == PROCEED, report["arms"]["lora-npo"]
    assert report["arms"]["broken"]["decision"] == STOP
    assert {"forget_drop", "retain_ppl_ratio", "xlang_leakage:ur", "mia_auc"} <= set(
        report["arms"]["broken"]["failed"])
    drop = _result(report, "forget_drop", "lora-npo")
    assert drop["level"] == "seed" and drop["decision"] == PASS
    assert drop["ci"]["low"] > 0.3 and drop["p_adj"] < 0.05
    assert set(drop["per_seed"]) == {"1", "2"} and drop["per_seed"]["1"]["n"] == N
    probe = _result(report, "probe_auc", "lora-npo")  # one value per seed, reported only
    assert probe["decision"] == REPORT and probe["in_fdr_family"] is False
    assert probe["estimate"] == pytest.approx(0.515) and probe["ci"]["low"] >= 0.51
    # The artifact records the summary and both renderings.
    loaded = load(tmp_path / "gate", kind="gate")
    assert loaded.metrics["broken"]["decision"] == STOP
    assert loaded.read_text("gate.md").count("| lora-npo |") >= len(GATES)
    assert (tmp_path / "gate" / "forest.png").read_bytes()[:4] == b"\x89PNG"


def test_single_seed_uses_sample_level_interval_and_says_so(evals, tmp_path):
    report = _gate_json(run(_config(), evals["baseline"], evals["working"][:1], tmp_path / "g"))
    drop = _result(report, "forget_drop", "lora-npo")
    assert drop["level"] == "sample" and "single seed" in drop["reason"]
    assert report["arms"]["lora-npo"]["level"] == "sample"
    probe = _result(report, "probe_auc", "lora-npo")
    assert probe["decision"] == REPORT and probe["ci"] is None
    assert probe["estimate"] == pytest.approx(0.51) and "one seed" in probe["reason"]


def test_nan_metric_fails_and_leaves_the_fdr_family(evals, tmp_path):
    rows = _samples(WORKING, np.random.default_rng(0))
    for row in rows:
        if row["set"] == "forget":
            row["fluency_nll"] = math.nan
    bad = make_eval(tmp_path, "nan", "lora-npo", 1, WORKING, samples=rows)
    report = _gate_json(run(_config(), evals["baseline"], [bad], tmp_path / "g"))
    fluency = _result(report, "fluency", "lora-npo")
    assert fluency["decision"] == FAIL and "NaN" in fluency["reason"]
    assert fluency["p_raw"] is None and fluency["in_fdr_family"] is False
    assert any(e.startswith("fluency@lora-npo") for e in report["fdr"]["excluded"])
    computable = sum(g["in_fdr_family"] for g in report["gates"])
    assert report["fdr"]["family_size"] == computable
    assert report["arms"]["lora-npo"]["decision"] == STOP


def test_same_seed_gives_identical_gate_json(evals, tmp_path):
    paths = evals["working"]
    first = run(_config(seed=3), evals["baseline"], paths, tmp_path / "a").read_text("gate.json")
    again = run(_config(seed=3), evals["baseline"], paths, tmp_path / "b").read_text("gate.json")
    assert first == again
    # Another seed moves the sample-level intervals (checked without a third artifact).
    base, arms = read_eval(evals["baseline"]), group_evals(paths)
    other = [r.to_dict() for r in evaluate_gates(_config(seed=4), base, arms)]

    def lows(gates):
        return [[v.get("low") for v in g["per_seed"].values()] for g in gates]

    assert lows(json.loads(first)["gates"]) != lows(other)


@pytest.mark.parametrize("settings, message", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"n_boot": 99}, "n_boot"),
    ({"ci_method": "jackknife"}, "jackknife"),
])
def test_config_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        GateConfig(**settings)


def test_toml_overrides_and_refuses_unknown_names(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[forget_drop]\nthreshold = 0.6\n[probe_auc]\nenabled = false\n")
    config = GateConfig.from_toml(good)
    assert config.rules["forget_drop"].threshold == 0.6
    assert config.rules["probe_auc"].enabled is False
    assert config.rules["mia_auc"].threshold == (0.4, 0.6)  # untouched default
    cases = {"[forget_rate_typo]\nthreshold = 0.1\n": "unknown gate 'forget_rate_typo'",
             "[forget_drop]\nthreshhold = 0.1\n": "unknown key.*threshhold",
             "[mia_auc]\nthreshold = 0.5\n": r"\[low, high\]",
             "[degenerate]\nthreshold = 'x'\n": "finite number",
             "[forget_drop\n": "not valid TOML"}
    for text, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            GateConfig.from_toml(path)


def test_mismatched_data_is_refused_naming_the_key(evals, tmp_path):
    other = make_eval(tmp_path, "other", "lora-npo", 1, WORKING,
                      data={**DATA, "sha256": {**DATA["sha256"], "retain": "zz"}})
    with pytest.raises(MetricError, match=r"data\.sha256\.retain differs"):
        run(_config(), evals["baseline"], [other], tmp_path / "g")


def test_too_few_samples_is_refused(evals, tmp_path):
    rows = [r for r in _samples(WORKING, np.random.default_rng(0))
            if r["set"] != "forget" or r["idx"] == 0]
    tiny = make_eval(tmp_path, "tiny", "lora-npo", 1, WORKING, samples=rows)
    with pytest.raises(MetricError, match="1 'forget' sample.*at least 2"):
        run(_config(), evals["baseline"], [tiny], tmp_path / "g")


def test_duplicate_arm_seed_is_refused(evals, tmp_path):
    twin = make_eval(tmp_path, "twin", "lora-npo", 1, WORKING)
    with pytest.raises(MetricError, match="two evals for arm 'lora-npo' seed 1"):
        run(_config(), evals["baseline"], [evals["working"][0], twin], tmp_path / "g")


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
    bad = runner.invoke(app, [*args, "--force", "--alpha", "2"])
    assert bad.exit_code == 2 and "alpha" in bad.output
