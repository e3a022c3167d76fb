"""Checkpoints chosen on validation: the rule on hand-set curves, the overlap refusal, and a
tiny-model run that records the curve and saves the chosen step's weights."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load
from mmie.core.errors import DataError
from mmie.core.models import ModelSpec
from mmie.edits.adapters import PEFT_WEIGHTS
from mmie.unlearn.stage import UnlearnConfig, run
from mmie.unlearn.validation import ValidationConfig, ValTexts, check_disjoint, choose, judge
from tests.conftest import EN, HI, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
UR = ["میں آج بازار جا رہا ہوں", "یہ کتاب بہت اچھی ہے", "بارش کے بعد موسم ٹھنڈا ہو گیا",
      "ہمارے گاؤں میں ایک پرانا مندر ہے"]
RULE = ValidationConfig(forget="f", retain="r", protect=(("ur", "u"), ("pa", "p")))


def rec(step: int, forget: float, ur: float, pa: float, ppl_ratio: float) -> dict:
    """A validation record whose retain NLL gives ``ppl_ratio`` against a step-0 NLL of 2."""
    return {"step": step, "forget_mass": forget, "own_mass": {"ur": ur, "pa": pa},
            "retain_nll": 2.0 + math.log(ppl_ratio)}


CURVE = [rec(0, 0.80, 0.50, 0.40, 1.00),
         rec(10, 0.50, 0.48, 0.39, 1.02),   # qualifies
         rec(20, 0.10, 0.40, 0.40, 1.00),   # lowest forget mass, but ur keeps 0.80 < 0.90
         rec(30, 0.20, 0.50, 0.40, 1.06),   # perplexity ratio 1.06 > 1.05
         rec(40, 0.30, 0.46, 0.37, 1.049),  # qualifies (ur 0.92, pa 0.925): the lowest of two
         rec(50, 0.30, 0.50, 0.40, 1.00)]   # same mass as step 40: the earlier step wins


def test_synthetic_curve_picks_the_documented_step():
    choice = choose(CURVE, RULE)
    assert (choice.step, choice.qualified) == (40, True)
    judged = judge(CURVE[2], CURVE[0], RULE)
    assert judged["retention"]["ur"] == pytest.approx(0.8) and not judged["qualified"]
    assert judge(CURVE[3], CURVE[0], RULE)["retain_ppl_ratio"] == pytest.approx(1.06)


def test_no_qualifying_checkpoint_keeps_the_documented_fallback():
    bad = [CURVE[0], CURVE[2], CURVE[3]]
    last = choose(bad, RULE)
    assert (last.step, last.qualified) == (30, False) and "no checkpoint" in last.reason
    step0 = ValidationConfig(forget="f", retain="r", protect=RULE.protect, fallback="step0")
    assert choose(bad, step0).step == 0
    # step 0 is the reference, never a candidate, even though it trivially meets the rule
    assert choose(CURVE[:1], RULE).qualified is False


def test_a_missing_measure_fails_the_rule():
    gone = {**rec(10, 0.1, 0.5, 0.4, 1.0), "own_mass": {"ur": None, "pa": 0.4}}
    assert choose([CURVE[0], gone], RULE).qualified is False


def test_validation_text_seen_in_training_is_refused():
    val = ValTexts(forget=["नया वाक्य", HI[3]], retain=[EN[0] + "!"], protect={})
    c = ValidationConfig(forget="hi_val.jsonl", retain="en_val.jsonl")
    with pytest.raises(DataError, match=r"hi_val.jsonl: 1 of 2 texts are also training"):
        check_disjoint(c, val, [*HI, *EN])
    check_disjoint(c, ValTexts(["नया वाक्य"], [EN[0] + "!"], {}), [*HI, *EN])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("val")
    out = {"hi": write_jsonl(root / "hi.jsonl", HI[:8]), "en": write_jsonl(root / "en.jsonl",
                                                                          EN[:8]),
           "hi_val": write_jsonl(root / "hi_val.jsonl", HI[8:]),
           "en_val": write_jsonl(root / "en_val.jsonl", EN[8:]),
           "ur_val": write_jsonl(root / "ur_val.jsonl", UR)}
    return out


def _config(files, **val) -> UnlearnConfig:
    validation = ValidationConfig(forget=str(files["hi_val"]), retain=str(files["en_val"]),
                                  protect=(("ur", str(files["ur_val"])),), every=2, **val)
    return UnlearnConfig(forget=str(files["hi"]), retain=(str(files["en"]),),
                         model=ModelSpec(name="tiny:llama", device="cpu"), steps=5, lr=1e-2,
                         batch_size=2, max_length=80, rank=2, checkpoint_every=0,
                         validation=validation)


def test_run_records_the_curve_and_the_chosen_step(files, tmp_path):
    art = run(_config(files), tmp_path / "a")
    val = art.metrics["validation"]
    assert [r["step"] for r in val["curve"]] == [0, 2, 4, 5]  # step 0, every 2, the last
    assert val["curve"][0]["retain_ppl_ratio"] == pytest.approx(1.0)
    assert val["chosen_step"] == choose(val["curve"], _config(files).validation).step
    assert set(val["data"]) == {str(files[k]) for k in ("hi_val", "en_val", "ur_val")}
    rows = [json.loads(line) for line in art.read_text("validation.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert (art.path / "validation.png").read_bytes()[:4] == b"\x89PNG"
    assert art.config["validation"]["every"] == 2


def test_step0_fallback_saves_the_identity_edit(files, tmp_path):
    # the tiny byte-level tokenizer has no whole-letter tokens: every token set is empty, no
    # protected mass is measurable, so no checkpoint qualifies and the fallback is kept
    art = run(_config(files, fallback="step0"), tmp_path / "b")
    val = art.metrics["validation"]
    assert (val["chosen_step"], val["qualified"]) == (0, False)
    assert val["token_sets"]["ur"]["size"] == 0
    weights = load_file(str(art.path / PEFT_WEIGHTS))
    assert all(torch.count_nonzero(w) == 0 for k, w in weights.items() if "lora_B" in k)
    assert any(torch.count_nonzero(w) for k, w in weights.items() if "lora_A" in k)


def test_validation_overlapping_training_is_refused_before_the_model_loads(files, tmp_path):
    cfg = _config(files)
    bad = ValidationConfig(forget=str(files["hi"]), retain=str(files["en_val"]))
    with pytest.raises(DataError, match="also training texts"):
        run(UnlearnConfig(**{**cfg.to_dict(), "model": cfg.model, "validation": bad}),
            tmp_path / "c")


def test_cli_val_every_writes_the_curve_and_the_chosen_step(files, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [
        "unlearn", "--forget", str(files["hi"]), "--retain", str(files["en"]), "--out", str(out),
        "--model", "tiny:llama", "--device", "cpu", "--steps", "3", "--batch-size", "2",
        "--max-length", "80", "--val-forget", str(files["hi_val"]), "--val-retain",
        str(files["en_val"]), "--val-protect", f"ur={files['ur_val']}", "--val-every", "2",
        "--json"])
    assert result.exit_code == 0, result.output
    art = load(out, kind="adapter")
    assert [r["step"] for r in art.metrics["validation"]["curve"]] == [0, 2, 3]
    assert json.loads(result.stdout)[0]["chosen_step"] == art.metrics["validation"]["chosen_step"]


@pytest.mark.parametrize("method", ["lora", "reft"])
def test_the_saved_weights_are_the_chosen_steps(files, tmp_path, monkeypatch, method):
    """Measures scripted by hand (the tiny byte-level tokenizer has no whole-letter tokens, so
    its token sets are empty): the rule picks step 4, whose weights must be the ones saved."""
    from mmie.core.models import loaded
    from mmie.edits.adapters import load_adapter
    from mmie.unlearn.valscore import Scorer

    script = iter([(0.8, 0.5, 2.0), (0.5, 0.48, 2.01), (0.3, 0.47, 2.02), (0.1, 0.2, 2.0)])
    seen: dict[int, dict] = {}

    def measure(self, adapter):
        forget, ur, nll = next(script)
        seen[len(seen)] = {k: v.detach().clone() for k, v in adapter.trainable().items()}
        return {"forget_mass": forget, "own_mass": {"ur": ur}, "leakage": {"ur": 0.0},
                "retain_nll": nll, "seconds": 0.0}

    monkeypatch.setattr(Scorer, "measure", measure)
    art = run(replace(_config(files), method=method, lr=None), tmp_path / "d")
    val = art.metrics["validation"]
    assert (val["chosen_step"], val["qualified"]) == (4, True)
    assert [r["qualified"] for r in val["curve"]] == [False, True, True, False]
    with loaded(ModelSpec(name="tiny:llama", device="cpu")) as lm:
        saved = {k: v.detach() for k, v in load_adapter(art.path, lm).trainable().items()}
    assert saved.keys() == seen[2].keys()
    assert all(torch.equal(saved[k], seen[2][k]) for k in saved)
    assert not all(torch.equal(saved[k], seen[3][k]) for k in saved)


def test_validation_leaves_training_unchanged(files, tmp_path):
    """Scoring reads the model without gradients or random draws: with the ``last`` adapter
    kept (no checkpoint qualifies on the tiny tokenizer), the weights are those of a run
    without validation, bit for bit."""
    cfg = _config(files)
    with_val = run(cfg, tmp_path / "with")
    without = run(replace(cfg, validation=None), tmp_path / "without")
    assert with_val.metrics["validation"]["chosen_step"] == cfg.steps
    a, b = (load_file(str(p.path / PEFT_WEIGHTS)) for p in (with_val, without))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "validation" not in without.metrics


def test_scorer_means_each_languages_own_column(files, monkeypatch):
    """With hand-set token sets (the tiny tokenizer's own are empty) the scorer's numbers are
    the per-text means of :func:`mass_scores` over each language's own items."""
    import mmie.unlearn.valscore as valscore
    from mmie.core.generation import score, text_items
    from mmie.core.models import loaded
    from mmie.lid.mass import TokenSet, mass_scores
    from mmie.unlearn.validation import read_validation

    c = _config(files).validation
    texts = read_validation(c, "text")
    with loaded(ModelSpec(name="tiny:llama", device="cpu")) as lm:
        n = len(lm.tokenizer)
        sets = {"hi": TokenSet("hi", "Deva", tuple(range(0, n, 2)), 1),
                "ur": TokenSet("ur", "Arab", tuple(range(1, n, 3)), 1)}
        monkeypatch.setattr(valscore, "build_token_sets", lambda tok, langs: sets)
        scorer = valscore.Scorer(lm, c, texts, max_length=80, batch_size=3)

        class Identity:  # no edit: the base model
            def edits(self):
                from contextlib import nullcontext
                return nullcontext()

        got = scorer.measure(Identity())
        ids = [sets["hi"].ids, sets["ur"].ids]
        direct = mass_scores(lm, scorer.items, ids, batch_size=1)
        owners = scorer.owner
        hi = [d.mass[0] for d, k in zip(direct, owners, strict=True) if k == 0]
        ur = [d.mass[1] for d, k in zip(direct, owners, strict=True) if k == 1]
        leak = [d.mass[0] for d, k in zip(direct, owners, strict=True) if k == 1]
        assert len(hi) == len(texts.forget) and len(ur) == len(texts.protect["ur"])
        assert got["forget_mass"] == pytest.approx(sum(hi) / len(hi), rel=1e-5)
        assert got["own_mass"]["ur"] == pytest.approx(sum(ur) / len(ur), rel=1e-5)
        assert got["leakage"]["ur"] == pytest.approx(sum(leak) / len(leak), rel=1e-5)
        scores = score(lm, text_items(lm, texts.retain, 80))
        nll = sum(s.nll_sum for s in scores) / sum(s.n_tokens for s in scores)
        assert got["retain_nll"] == pytest.approx(nll, rel=1e-5)
        assert 0 < got["forget_mass"] < 1


HI_NEW = ["आज शाम को हम नदी के किनारे टहलने गए", "मेरी बहन डॉक्टर बनना चाहती है",
          "बाज़ार में आम बहुत सस्ते मिल रहे थे"]
EN_NEW = ["We walked along the river this evening", "My sister wants to become a doctor",
          "Mangoes were very cheap in the market"]


def test_validation_under_two_processes_matches_one(files, tmp_path):
    """Under torchrun every process scores the whole split on its own (no collective): the
    run finishes, and its curve and kept step are the one-process run's."""
    import torch.distributed as dist

    from tests.test_unlearn_ddp import launch

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    hv, ev = write_jsonl(tmp_path / "hv.jsonl", HI_NEW), write_jsonl(tmp_path / "ev.jsonl", EN_NEW)
    args = ["-m", "mmie", "unlearn", "--model", "tiny:llama", "--device", "cpu", "--forget",
            str(files["hi"]), "--retain", str(files["en"]), "--steps", "3", "--batch-size", "2",
            "--max-length", "80", "--rank", "2", "--lr", "1e-2", "--checkpoint-every", "0",
            "--val-forget", str(hv), "--val-retain", str(ev), "--val-protect",
            f"ur={files['ur_val']}", "--val-every", "2", "--out", str(tmp_path / "ddp")]
    got = launch(tmp_path, args, "val")
    assert got.returncode == 0, f"{got.output}\n{got.stderr}"
    two = load(tmp_path / "ddp", kind="adapter")
    cfg = _config(files)
    cfg = replace(cfg, steps=3, validation=replace(cfg.validation, forget=str(hv),
                                                   retain=str(ev)))
    one = run(cfg, tmp_path / "one")
    assert two.metrics["processes"] == 2
    a, b = (x.metrics["validation"] for x in (one, two))
    assert a["chosen_step"] == b["chosen_step"]
    assert [r["step"] for r in b["curve"]] == [0, 2, 3]
    for ra, rb in zip(a["curve"], b["curve"], strict=True):
        assert rb["retain_nll"] == pytest.approx(ra["retain_nll"], rel=1e-4)


def test_pack_texts_is_a_sliding_window_of_newline_joined_texts():
    from mmie.core.data import pack_texts
    assert pack_texts(["a", "b", "c"], 1) == ["a", "b", "c"]
    assert pack_texts(["a", "b", "c"], 2) == ["a\nb", "b\nc"]
    assert pack_texts(["a", "b"], 3) == ["a\nb"]
    with pytest.raises(ValueError, match="pack"):
        pack_texts(["a"], 0)


def test_retain_pack_packs_retain_and_protected_texts_not_forget_or_alternatives(files):
    from mmie.unlearn.stage import read_data
    data = read_data(replace(_config(files), retain_pack=2))
    assert len(data.retain[0]) == 7 and data.retain[0][0] == EN[0] + "\n" + EN[1]
    assert data.forget == HI[:8]
    assert data.validation.protect["ur"] == [UR[i] + "\n" + UR[i + 1] for i in range(3)]
    assert data.validation.forget == HI[8:]
    with pytest.raises(ValueError, match="retain pack"):
        replace(_config(files), retain_pack=0)
