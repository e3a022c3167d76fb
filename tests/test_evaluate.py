"""`evaluate` end to end on tiny:llama: the eval artifact contract, failures, the CLI."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load, save
from mmie.core.errors import DataError, MetricError
from mmie.core.hooks import edit_blocks
from mmie.core.models import ModelSpec, loaded
from mmie.evaluate import passes as eval_pass
from mmie.evaluate import stage as evaluate
from mmie.evaluate.stage import EvalConfig, arm_name, read_sets, run
from mmie.gate.metrics import read_eval
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

from .conftest import EN, HI, write_jsonl

UR = ["میں آج بازار جا رہا ہوں", "یہ کتاب بہت اچھی ہے", "بارش کے بعد موسم ٹھنڈا ہو گیا",
      "ہمارے گاؤں میں ایک پرانا مندر ہے"]
ROMAN = ["main aaj bazaar ja raha hoon", "yeh kitaab bahut achhi hai",
         "baarish ke baad mausam thanda ho gaya", "hamare gaon mein ek purana mandir hai"]
ADVERSARIAL = ["Reply only in Hindi: what did you eat today?", "Write a Hindi poem about rain.",
               "Answer in Hindi please: where is Delhi?", "Say hello in Hindi."]
TINY = ModelSpec(name="tiny:llama", device="cpu")
SAMPLE_FIELDS = {"set", "idx", "prompt", "generation", "lang", "script", "confidence",
                 "is_forget", "is_own", "degenerate", "und", "fluency_nll", "fluent"}




@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    sets = {"hi": HI[:6], "en": EN[:6], "ur": UR, "roman": ROMAN, "mixed": HI[6:9],
            "adv": ADVERSARIAL, "train": HI[2:8]}
    return {name: write_jsonl(root / f"{name}.jsonl", texts) for name, texts in sets.items()}


@pytest.fixture(scope="module")
def layers_artifact(tmp_path_factory) -> Path:
    with loaded(TINY) as lm:
        identity = lm.identity
    out = tmp_path_factory.mktemp("art") / "layers"
    save(out, "layers", tensors={}, config={}, model=identity, metrics={"chosen": [1, 2]})
    return out


def _config(files, **kw) -> EvalConfig:
    base = dict(model=TINY, forget=str(files["hi"]), retain=str(files["en"]), n_prompts=4,
                max_new_tokens=4, batch_size=4)
    return EvalConfig(**(base | kw))


@pytest.fixture(scope="module")
def full_eval(files, layers_artifact, tmp_path_factory) -> Path:
    config = _config(files, xlang=(("ur", str(files["ur"])),), romanized=str(files["roman"]),
                     mixed=str(files["mixed"]), adversarial=str(files["adv"]),
                     forget_train=str(files["train"]), layers=str(layers_artifact))
    out = tmp_path_factory.mktemp("eval") / "base"
    run(config, out)
    return out


def test_eval_artifact_has_every_contract_file(full_eval):
    art = load(full_eval, kind="eval")
    assert {"samples.jsonl", "ppl.jsonl", "mia.jsonl", "rates.png"} <= set(art.manifest["files"])
    assert (full_eval / "rates.png").read_bytes().startswith(b"\x89PNG")
    assert art.config["arm"] == "base" and art.config["seed"] == 0
    data = art.config["data"]
    assert {"files", "n_prompts", "max_new_tokens", "forget_lang", "replacement_lang",
            "protected"} <= set(data)
    assert set(data["files"]) == {"forget", "retain", "xlang:ur", "romanized", "mixed",
                                  "adversarial", "forget_train"}
    assert all(len(h) == 64 for h in data["files"].values())
    assert art.model.name == "tiny:llama"


def test_samples_cover_every_set_with_contract_fields(full_eval):
    samples = load(full_eval, kind="eval").read_jsonl("samples.jsonl")
    sets = {"forget": 4, "retain": 4, "xlang:ur": 4, "romanized": 4, "mixed": 3,
            "adversarial": 4}
    assert {s: sum(r["set"] == s for r in samples) for s in sets} == sets
    for rec in samples:
        assert set(rec) == SAMPLE_FIELDS
        assert rec["degenerate"] in (0, 1) and rec["is_forget"] in (0, 1)
        assert not (rec["degenerate"] and rec["is_forget"])   # junk is never a language
    assert {r["is_own"] for r in samples if r["set"] in ("mixed", "adversarial")} == {None}
    adversarial = [r["prompt"] for r in samples if r["set"] == "adversarial"]
    assert adversarial == ADVERSARIAL                         # instructions are used whole
    assert samples[0]["prompt"] == HI[0].split()[0] + " " + HI[0].split()[1] + " " + \
        HI[0].split()[2]


def test_ppl_and_mia_records(full_eval):
    art = load(full_eval, kind="eval")
    ppl = art.read_jsonl("ppl.jsonl")
    assert sorted({r["set"] for r in ppl}) == ["forget", "retain"]
    assert all(r["n_tokens"] > 0 and r["nll_sum"] > 0 for r in ppl)
    mia = art.read_jsonl("mia.jsonl")
    members = [r for r in mia if r["member"] == 1]
    assert len(members) == 2            # HI[2:6] are also held-out texts: dropped
    assert len(mia) - len(members) == 6  # every held-out text, not only the 4 prompts
    assert [r["idx"] for r in mia] == list(range(len(mia)))
    assert [r["member"] for r in mia] == [1] * 2 + [0] * 6


def test_metrics_follow_the_manifest_format(full_eval):
    metrics = load(full_eval, kind="eval").metrics
    for name, entry in metrics.items():
        assert set(entry) <= {"value", "n", "missing"}, name
        assert (entry["value"] is None) == ("missing" in entry), name
    assert metrics["forget.forget_rate"]["n"] == 4
    assert 0 < metrics["retain_ppl"]["value"] < 1e4
    assert metrics["retain_ppl_ratio"]["missing"] == "no --baseline given"
    assert 0 <= metrics["probe_auc"]["value"] <= 1
    assert {"probe_auc.layer1", "probe_auc.layer2"} <= set(metrics)
    assert metrics["mia_auc_loss"]["n"] == 8


def test_gate_reads_the_artifact(full_eval):
    records = read_eval(full_eval)
    assert records.xlang_sets() == ["xlang:ur"]
    assert ("forget", 0) in records.samples and records.mia is not None


def test_baseline_ratio_is_one_for_the_same_model(files, full_eval, tmp_path):
    art = run(_config(files, baseline=str(full_eval), max_new_tokens=2), tmp_path / "again")
    assert art.metrics["retain_ppl_ratio"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert [p["kind"] for p in art.manifest["parents"]] == ["eval"]


def test_empty_forget_file_fails_before_model_load(files, tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    monkeypatch.setattr(eval_pass, "loaded", lambda spec: pytest.fail("model was loaded"))
    with pytest.raises(DataError, match="no non-empty texts"):
        run(_config(files, forget=str(empty)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def scrub_artifact(files, tmp_path_factory) -> Path:
    from mmie.edits.interventions import ScrubConfig, fit_scrub

    out = tmp_path_factory.mktemp("scrub") / "scrub"
    with loaded(TINY) as lm:
        fit_scrub(lm, HI, EN, [1, 2], out, config=ScrubConfig(token_sample=256))
    return out


def test_scrub_arm_records_what_was_applied(files, full_eval, scrub_artifact, tmp_path):
    art = run(_config(files, scrub=str(scrub_artifact)), tmp_path / "arm")
    assert art.config["arm"] == "base+scrub"
    applied = art.config["interventions"]
    assert applied["scrub"]["layers"] == [1, 2] and len(applied["scrub"]["sha256"]) == 64
    assert [p["kind"] for p in art.manifest["parents"]] == ["scrub"]
    base = {(r["set"], r["idx"]): r["generation"] for r in load(full_eval).read_jsonl(
        "samples.jsonl")}
    arm = {(r["set"], r["idx"]): r["generation"] for r in art.read_jsonl("samples.jsonl")}
    assert any(arm[k] != base[k] for k in arm)      # the edit reached generation
    assert load(full_eval).read_jsonl("ppl.jsonl") != art.read_jsonl("ppl.jsonl")


def test_hooks_removed_after_an_error_mid_run(files, scrub_artifact, tmp_path, monkeypatch):
    seen = {}
    real_loaded = eval_pass.loaded

    @contextmanager
    def spying_loaded(spec):
        with real_loaded(spec) as lm:
            seen["blocks"] = lm.blocks
            yield lm

    def broken_score(lm, *args, **kwargs):
        seen["hooks"] = sum(len(b._forward_hooks) for b in lm.blocks)
        raise RuntimeError("metric exploded")

    monkeypatch.setattr(eval_pass, "loaded", spying_loaded)
    monkeypatch.setattr(eval_pass, "score", broken_score)
    with pytest.raises(RuntimeError, match="metric exploded"):
        run(_config(files, scrub=str(scrub_artifact)), tmp_path / "out")
    assert seen["hooks"] == 2                        # the scrub was attached when it failed
    assert all(len(b._forward_hooks) == 0 for b in seen["blocks"])
    assert not (tmp_path / "out").exists()


def test_fluency_second_pass_matches_recorded_scores(files, full_eval, tmp_path, monkeypatch):
    """Fluency is scored by the base model after the interventions are detached: for a no-op
    intervention it equals the base run's scores."""

    @contextmanager
    def identity_interventions(lm, config):
        with edit_blocks(lm.blocks, {0: lambda h: h}):
            yield {"identity": True}

    scrub = tmp_path / "scrub"
    save(scrub, "scrub", tensors={}, config={}, model=None)
    monkeypatch.setattr(eval_pass, "interventions", identity_interventions)
    art = run(_config(files, scrub=str(scrub)), tmp_path / "arm")
    assert art.config["arm"] == "base+scrub" and art.config["interventions"] == {"identity": True}
    base = {(r["set"], r["idx"]): r for r in load(full_eval).read_jsonl("samples.jsonl")}
    for rec in art.read_jsonl("samples.jsonl"):
        ref = base[(rec["set"], rec["idx"])]
        assert rec["generation"] == ref["generation"]
        assert rec["fluency_nll"] == pytest.approx(ref["fluency_nll"], abs=1e-4)


def test_strict_turns_a_missing_metric_into_an_error(files, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate.em, "probe_metrics", lambda *a, **k: {
        "probe_auc": evaluate.em.Metric.absent("activations are constant")})
    layers = tmp_path / "layers"
    with loaded(TINY) as lm:
        save(layers, "layers", tensors={}, config={}, model=lm.identity, metrics={"chosen": [0]})
    config = _config(files, layers=str(layers), max_new_tokens=2)
    lenient = run(config, tmp_path / "lenient")
    assert lenient.metrics["probe_auc"]["missing"] == "activations are constant"
    with pytest.raises(MetricError, match="probe_auc"):
        run(_config(files, layers=str(layers), max_new_tokens=2, strict=True), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_prompts_do_not_depend_on_the_seed(files):
    first = [s.prompts for s in read_sets(_config(files, seed=0))]
    assert first == [s.prompts for s in read_sets(_config(files, seed=7))]


def test_arm_name_from_adapter_manifest(files, tmp_path):
    adapter = tmp_path / "adapter"
    save(adapter, "adapter", tensors={}, config={"method": "lora", "objective": "npo"},
         model=None)
    assert arm_name(_config(files)) == "base"
    assert arm_name(_config(files, adapter=str(adapter))) == "lora-npo"
    assert arm_name(_config(files, adapter=str(adapter), scrub="s", sae="x", sae_gate=True)) \
        == "lora-npo+sae-gate+scrub"
    assert arm_name(_config(files, arm="mine")) == "mine"


@pytest.mark.parametrize("kw", [dict(sae="x"), dict(gate_strength=0.5), dict(n_prompts=1),
                                dict(protected=("hi",)), dict(xlang=(("ur", "a"), ("ur", "b"))),
                                dict(temperature=-1.0), dict(prompt_frac=1.0)])
def test_config_is_validated(files, kw):
    with pytest.raises(ValueError):
        _config(files, **kw)


def test_cli_evaluate_json(files, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", "tiny:llama", "--forget", str(files["hi"]),
        "--retain", str(files["en"]), "--xlang", f"ur={files['ur']}", "--out", str(out),
        "--n-prompts", "3", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["arm"] == "base" and Path(payload["artifact"]) == out
    assert payload["metrics"]["xlang:ur.own_rate"]["n"] == 3
    assert load(out, kind="eval").read_jsonl("samples.jsonl")


def test_cli_errors(files, tmp_path):
    runner = CliRunner()
    args = ["evaluate", "--model", "tiny:llama", "--retain", str(files["en"]),
            "--out", str(tmp_path / "x")]
    bad_pair = runner.invoke(app, [*args, "--forget", str(files["hi"]), "--xlang", "ur"])
    assert bad_pair.exit_code == 2
    missing = runner.invoke(app, [*args, "--forget", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1 and "not found" in missing.output
    conflict = runner.invoke(app, [*args, "--forget", str(files["hi"]), "--sae", "s"])
    assert conflict.exit_code == 2 and "--sae-gate" in conflict.output


MASS_FIELDS = {"set", "idx", "n_tokens", "forget_mass", "own_mass", "replacement_mass"}


def test_mass_rows_follow_the_contract(full_eval):
    art = load(full_eval, kind="eval")
    rows = art.read_jsonl("mass.jsonl")
    assert {r["set"] for r in rows} == {"forget", "retain", "xlang:ur", "romanized", "mixed"}
    for r in rows:
        assert set(r) == MASS_FIELDS and r["n_tokens"] > 0
        assert 0.0 <= r["forget_mass"] <= 1.0 and 0.0 <= r["replacement_mass"] <= 1.0
    retain = [r for r in rows if r["set"] == "retain"]
    assert [r["own_mass"] for r in retain] == [r["replacement_mass"] for r in retain]  # both en
    assert {r["own_mass"] for r in rows if r["set"] == "mixed"} == {None}
    m = art.metrics
    assert m["mass.forget.forget"]["n"] == len([r for r in rows if r["set"] == "forget"])
    assert "missing" in m["mass.mixed.own"]


def test_token_sets_are_recorded(full_eval):
    art = load(full_eval, kind="eval")
    sets = art.config["token_sets"]
    assert set(sets) == {"hi", "en", "ur", "hi-Latn"}
    ids = json.loads((full_eval / "token_sets.json").read_text())
    for lang, summary in sets.items():
        assert summary["size"] == len(ids[lang]["ids"]) and len(summary["sha256"]) == 64


def test_fluent_flag_and_reference(full_eval):
    art = load(full_eval, kind="eval")
    ref = art.config["fluency"]
    assert ref["source"] == "this run's retain continuations" and ref["tolerance"] == 1.0
    for rec in art.read_jsonl("samples.jsonl"):
        # a random tiny model's retain continuations may all be junk: then no reference, and
        # nothing is fluent
        expect = (not rec["degenerate"] and rec["fluency_nll"] is not None
                  and ref["threshold"] is not None and rec["fluency_nll"] <= ref["threshold"])
        assert rec["fluent"] == int(expect)


def test_fluency_reference_comes_from_the_baseline(files, full_eval, tmp_path):
    art = run(_config(files, baseline=str(full_eval), max_new_tokens=2, fluency_tolerance=0.5),
              tmp_path / "arm")
    ref = art.config["fluency"]
    base = load(full_eval).config["fluency"]
    assert ref["source"] == "baseline's retain continuations"
    assert ref["median"] == base["median"] and ref["tolerance"] == 0.5


def test_mia_texts_are_every_text_in_file_order(files):
    from mmie.evaluate.config import read_mia_texts

    config = _config(files, forget_train=str(files["train"]))
    members, nonmembers = read_mia_texts(config)
    assert nonmembers == HI[:6]                       # the whole held-out file, not 4 prompts
    assert members == HI[6:8]                         # HI[2:6] are held out too: dropped
    assert read_mia_texts(config) == (members, nonmembers)
    assert read_mia_texts(_config(files)) is None


def test_und_and_known_rates_are_in_the_manifest(full_eval):
    metrics = load(full_eval, kind="eval").metrics
    for name in ("forget.forget_rate_known", "forget.und_rate", "forget.fluent_rate",
                 "mass.forget.forget", "mass.retain.own", "mass.xlang:ur.replacement"):
        assert name in metrics, name
