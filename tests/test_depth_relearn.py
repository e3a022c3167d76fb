"""Relearn: recovery fraction by hand, the attack set kept off every evaluation text, a tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.activations import harvest
from mmie.core.artifacts import load, save
from mmie.core.errors import DataError
from mmie.core.losses import logprobs_and_subset_mass, token_logprobs
from mmie.core.models import ModelSpec, loaded
from mmie.depth.arms import ArmSpec, fixed_adapter
from mmie.depth.attack import AttackSpec
from mmie.depth.recovery import Sums, recovery_fraction, recovery_interval
from mmie.depth.relearn import RelearnConfig, check_disjoint, run, text_hash
from mmie.edits.adapters import AdapterSpec, LoraAdapter
from mmie.edits.interventions import attached, fit_scrub
from tests.conftest import EN, HI, SAMPLE, write_jsonl

runner = CliRunner()
TINY = ModelSpec(name="tiny:llama", device="cpu")


def test_recovery_fraction_by_hand():
    # mean NLL per token: arm before 10/4 = 2.5, after 6/4 = 1.5, base 4/4 = 1.0
    before, after = Sums.of([4, 6], [2, 2]), Sums.of([2, 4], [2, 2])
    base = Sums.of([1, 3], [2, 2])
    assert float(recovery_fraction(before, after, base)) == pytest.approx((2.5 - 1.5) / 1.5)
    # texts resampled as [0, 0]: before 2, after 1, base 0.5 -> 1 / 1.5
    assert float(recovery_fraction(before, after, base, [0, 0])) == pytest.approx(1 / 1.5)
    got = recovery_interval(before, after, base, n_boot=200)
    assert got["value"] == pytest.approx(2 / 3) and got["low"] <= got["value"] <= got["high"]


def test_recovery_fraction_sign_free_and_missing_when_nothing_was_removed():
    # script mass went down (arm 0.1, base 0.6); after the attack 0.35: half came back
    before, after, base = (Sums.of([x, x], [1, 1]) for x in (0.1, 0.35, 0.6))
    assert float(recovery_fraction(before, after, base)) == pytest.approx(0.5)
    same = Sums.of([1.0, 2.0], [1, 1])
    got = recovery_interval(same, Sums.of([0.5, 1.0], [1, 1]), same)
    assert got["value"] is None and "removed nothing" in got["missing"]


def test_schedule_always_starts_before_the_attack():
    assert AttackSpec(steps=(20, 5)).steps == (0, 5, 20)
    with pytest.raises(ValueError, match=">= 0"):
        AttackSpec(steps=(-1, 3))


def test_overlap_with_an_evaluation_text_is_refused():
    hashes = check_disjoint(HI[:3], {"held.jsonl": HI[3:]})
    assert hashes["attack"] == [text_hash(t) for t in HI[:3]]
    assert not set(hashes["attack"]) & set(hashes["eval"])
    # the same sentence with other spacing is the same text
    with pytest.raises(DataError, match="1 attack text"):
        check_disjoint(HI[:3], {"held.jsonl": ["  " + HI[1].replace(" ", "   ") + "\n"]})


def test_run_refuses_overlap_before_loading_a_model(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", HI[:6])
    write_jsonl(tmp_path / "h.jsonl", HI[7:] + HI[4:5])  # beyond --max-heldout still counts
    config = RelearnConfig(attack=str(tmp_path / "a.jsonl"), heldout=str(tmp_path / "h.jsonl"),
                           max_heldout=2, model=ModelSpec(name="no/such-model"))
    with pytest.raises(DataError, match="disjoint"):
        run(config, tmp_path / "out")


def test_subset_mass_matches_token_logprobs():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(11, 8,
                                                                             dtype=torch.float64)
    labels, mask = torch.randint(0, 11, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    logp, mass = logprobs_and_subset_mass(hidden, weight, labels, torch.arange(11), mask,
                                          chunk_size=3)
    assert torch.allclose(logp, token_logprobs(hidden, weight, labels, mask, chunk_size=3))
    assert torch.allclose(mass[mask], torch.zeros(8, dtype=torch.float64), atol=1e-12)
    _, two = logprobs_and_subset_mass(hidden, weight, labels, torch.tensor([2, 7]), mask)
    probs = torch.softmax(hidden @ weight.T, -1)
    assert torch.allclose(two[mask].exp(), (probs[..., 2] + probs[..., 7])[mask])


def _lora_artifact(path):
    with loaded(TINY) as lm:
        torch.manual_seed(1)
        ad = LoraAdapter.create(lm, AdapterSpec("lora", layers=(0, 1), rank=2))
        with torch.no_grad():
            for p in ad.trainable().values():
                p.normal_(0, 0.1)
        payload = ad.payload()
        save(path, "adapter", tensors=payload.tensors, writer=payload.writer, model=lm.identity,
             config={"adapter": ad.spec.to_dict(), "method": "lora", "objective": "test"})
    return path


def test_lora_arm_merged_equals_lora_arm_attached(tmp_path):
    path = _lora_artifact(tmp_path / "lora")
    states = []
    for fixed in (False, True):
        with loaded(TINY) as lm:
            ctx = (fixed_adapter(lm, ArmSpec(adapter=str(path))) if fixed
                   else attached(lm, adapter=path))
            with ctx as record:
                states.append(harvest(lm, EN[:3], [1], token_sample=0).pooled[1])
            assert not fixed or record["merged"]
    assert torch.allclose(states[0], states[1], atol=1e-5)
    with loaded(TINY) as lm:
        plain = harvest(lm, EN[:3], [1], token_sample=0).pooled[1]
    assert not torch.allclose(plain, states[0], atol=1e-3)  # the arm does change the model


def _ablation(path):
    from mmie.edits.neurons import mask_tensors

    with loaded(TINY) as lm:
        width = lm.blocks[0].mlp.down_proj.in_features
        mask = torch.zeros(width, dtype=torch.bool)
        mask[:4] = True
        save(path, "neurons", tensors=mask_tensors({0: mask}), model=lm.identity,
             config={"role": "ablation", "scale": 0.0})
    return path


def test_neuron_arm_scales_the_attack_lora_path_too(tmp_path):
    from mmie.depth.arms import applied
    from mmie.depth.attack import attack_lora

    arm = ArmSpec(neurons=str(_ablation(tmp_path / "abl")))
    with loaded(TINY) as lm:
        attack_lora(lm, AttackSpec(rank=2))
        wrapper = lm.blocks[0].mlp.down_proj
        assert hasattr(wrapper, "lora_A")  # PEFT's layer, base and LoRA path inside
        with applied(lm, arm, adapter=False) as record:
            assert record["arm"] == "neurons" and wrapper._forward_pre_hooks
        assert not wrapper._forward_pre_hooks


def _config(tmp_path, **kw) -> RelearnConfig:
    write_jsonl(tmp_path / "attack.jsonl", HI[:6])
    write_jsonl(tmp_path / "held.jsonl", HI[6:])
    return RelearnConfig(attack=str(tmp_path / "attack.jsonl"),
                         heldout=str(tmp_path / "held.jsonl"), model=TINY,
                         spec=AttackSpec(steps=(0, 1, 2), lr=1e-2, batch_size=4, max_length=32),
                         controls=(("ur", str(SAMPLE / "ur.jsonl")),), max_heldout=6,
                         n_boot=200, **kw)


def test_tiny_run_writes_the_artifact(tmp_path):
    with loaded(TINY) as lm:
        fit_scrub(lm, HI, EN, [0, 1], tmp_path / "scrub")
    config = _config(tmp_path, arm=ArmSpec(scrub=str(tmp_path / "scrub")),
                     eval_texts=(str(SAMPLE / "hi.jsonl"),))
    run(config, tmp_path / "out")
    art = load(tmp_path / "out", kind="relearn")
    m = art.metrics
    assert m["steps"] == [0, 1, 2] and m["arm_name"] == "base+scrub"
    assert m["kept_during_attack"] == ["scrub"]
    assert set(m["curves"]) == {"arm", "base"} and set(m["curves"]["arm"]["nll"]) == {"0", "1", "2"}
    assert len(m["losses"]["arm"]) == 2 and set(m["controls"]["ur"]) == {"arm", "base"}
    assert m["recovery"]["nll"]["0"]["value"] == 0.0
    # the tiny tokenizer is byte-level: no token is a whole Devanagari character
    assert m["metrics"] == ["nll"] and "script_mass" in m["missing"]
    hashes = art.config["hashes"]
    assert hashes["attack"] == [text_hash(t) for t in HI[:6]]
    assert not set(hashes["attack"]) & set(hashes["eval"])
    assert {text_hash(t) for t in HI[6:]} <= set(hashes["eval"])
    rows = art.read_jsonl("scores.jsonl")
    assert {r["run"] for r in rows} == {"arm", "base"} and {r["step"] for r in rows} == {0, 1, 2}
    assert np.isfinite([r["nll_sum"] for r in rows]).all()


def _cli(tmp_path, *extra: str):
    config = _config(tmp_path)
    return runner.invoke(app, [
        "relearn", "--attack", config.attack, "--heldout", config.heldout, "--model",
        "tiny:llama", "--device", "cpu", "--steps", "1", "--batch-size", "4",
        "--max-length", "32", "--n-boot", "100", "--forget-script", "Latn", *extra])


def test_cli_relearn_on_a_merged_lora_arm(tmp_path):
    lora = _lora_artifact(tmp_path / "lora")
    result = _cli(tmp_path, "--adapter", str(lora), "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    art = load(tmp_path / "r", kind="relearn")
    m = art.metrics
    assert m["arm_name"] == "lora-test" and m["kept_during_attack"] == []
    assert art.config["applied"]["adapter"]["merged"] is True
    assert m["steps"] == [0, 1] and m["recovery"]["nll"]["1"]["value"] is not None
    assert "script_mass" in m["metrics"]  # Latin letters are whole byte tokens


def test_cli_relearn_base_has_no_recovery_and_refuses_overlap(tmp_path):
    result = _cli(tmp_path, "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    m = load(tmp_path / "r", kind="relearn").metrics
    assert m["arm_name"] == "base" and m["recovery"]["nll"]["1"]["value"] is None
    assert "no arm" in m["recovery"]["nll"]["1"]["missing"]
    result = _cli(tmp_path, "--eval-texts", str(tmp_path / "attack.jsonl"),
                  "--out", str(tmp_path / "r2"))
    assert result.exit_code == 1 and "disjoint" in result.output
    assert not (tmp_path / "r2").exists()
