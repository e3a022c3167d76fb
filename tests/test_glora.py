"""Language gate and gated LoRA: the latch by hand, the threshold rule, exact identity where the
gate never fires, cached decoding equal to one pass, artifacts checked on load, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load, save
from mmie.core.errors import ArtifactError
from mmie.core.models import ModelSpec, loaded
from mmie.edits.adapters import AdapterSpec, load_adapter
from mmie.edits.glora import GatedLoraAdapter
from mmie.edits.langgate import (
    LangGateConfig,
    LanguageGate,
    Latch,
    choose_threshold,
    fit_probe,
    gate_live,
)
from mmie.unlearn.config import UnlearnConfig
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import relearn_on

runner = CliRunner()
TINY = ModelSpec(name="tiny:llama", device="cpu")


def _gate(d: int, threshold: float, window: int = 1, layer: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return LanguageGate(layer, window, torch.zeros(d), torch.ones(d),
                        torch.randn(d, generator=g), 0.0, threshold)


def test_latch_by_hand_and_step_by_step():
    gate = LanguageGate(0, 2, torch.zeros(1), torch.ones(1), torch.ones(1), 0.0, 1.0)
    scores = torch.tensor([[0.0, 3.0, 0.0, 0.0, 5.0], [0.0, 1.0, 0.5, 1.0, 1.0]])
    scored = torch.ones_like(scores, dtype=torch.bool)
    scored[:, 0] = False  # BOS
    # row 0: windows (-, -, 1.5, 0, 2.5) -> fires at 2 and stays on; row 1: never above 1.0
    expected = torch.tensor([[0.0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert torch.equal(Latch(gate).step(scores, scored), expected)
    latch = Latch(gate)
    parts = [latch.step(scores[:, :2], scored[:, :2])]
    parts += [latch.step(scores[:, t:t + 1], scored[:, t:t + 1]) for t in range(2, 5)]
    assert torch.equal(torch.cat(parts, dim=1), expected)
    # a new pass of more than one token starts new sequences
    assert torch.equal(latch.step(scores[:, 2:4], scored[:, 2:4]), torch.zeros(2, 2))


def test_threshold_rule():
    assert choose_threshold([5.0, 7.0], [1.0, 3.0]) == 4.0  # separable: the midpoint
    assert choose_threshold([2.0, 7.0], [1.0, 3.0]) == 3.0  # not: no negative fires
    with pytest.raises(ValueError):
        choose_threshold([], [1.0])


def test_probe_separates_shifted_clusters():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(200, 8, generator=g) + torch.tensor([3.0] + [0.0] * 7)
    neg = torch.randn(400, 8, generator=g)
    mean, scale, weight, bias = fit_probe(pos, neg, LangGateConfig())
    gate = LanguageGate(0, 1, mean, scale, weight, bias, 0.0)
    accuracy = ((gate.token_scores(pos) > 0).float().mean() +
                (gate.token_scores(neg) <= 0).float().mean()) / 2
    assert accuracy > 0.9
    assert weight[0] > weight[1:].abs().max()  # the informative direction dominates


def _adapter(lm, gate: LanguageGate) -> GatedLoraAdapter:
    spec = AdapterSpec("glora", layers=tuple(range(gate.layer + 1, lm.n_layers)), rank=2)
    adapter = GatedLoraAdapter._build(lm, spec, gate)
    with torch.no_grad():
        for p in adapter.params.values():
            p.normal_(0, 0.3)
    return adapter


def _logits(lm, text: str) -> torch.Tensor:
    ids = lm.tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_exact_base_model_where_the_gate_never_fires():
    with loaded(TINY) as lm:
        base = _logits(lm, HI[0])
        for threshold, changed in ((math.inf, False), (-math.inf, True)):
            adapter = _adapter(lm, _gate(lm.identity.d_model, threshold))
            with adapter.edits():
                edited = _logits(lm, HI[0])
            assert torch.equal(edited, base) is not changed
        assert torch.equal(_logits(lm, HI[0]), base)  # nothing left behind


def _halfway_gate(lm, ids) -> LanguageGate:
    """A window-2 gate whose threshold is the median window score of ``ids``: it fires
    partway through the text."""
    probe, got = _gate(lm.identity.d_model, 0.0, window=2), {}
    handle = lm.blocks[0].register_forward_hook(
        lambda m, a, o: got.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        handle.remove()
    window = probe.token_scores(got["h"][0, 1:]).unfold(0, 2, 1).mean(-1)
    probe.threshold = float(window.sort().values[len(window) // 2])
    return probe


def test_cached_decoding_gives_the_one_pass_gate_and_logits():
    with loaded(TINY) as lm:
        ids = lm.tokenizer([HI[1] + " " + EN[1]], return_tensors="pt")["input_ids"]
        adapter = _adapter(lm, _halfway_gate(lm, ids))
        with torch.no_grad(), gate_live(lm, adapter.gate) as latch:
            lm.model(input_ids=ids)
            fired = latch.values[0]
        assert 0 < int(fired.sum()) < len(fired) - 1  # on partway, so the test can fail
        cut = ids.shape[1] // 4
        with torch.no_grad(), adapter.edits():
            full = lm.model(input_ids=ids).logits
            out = lm.model(input_ids=ids[:, :cut], use_cache=True)
            past, steps = out.past_key_values, [out.logits]
            for t in range(cut, ids.shape[1]):
                out = lm.model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                steps.append(out.logits)
        gap = (torch.cat(steps, dim=1) - full).abs().amax(-1)
        assert float(gap.max()) < 1e-3, gap  # float noise of the two attention paths
        with torch.no_grad():
            effect = (lm.model(input_ids=ids).logits - full).abs().amax(-1)
        assert float(effect[0, cut:].min()) > 1e-2  # a dropped latch would show up


def _glora_artifact(lm, path, gate: LanguageGate):
    adapter = _adapter(lm, gate)
    payload = adapter.payload()
    save(path, "adapter", tensors=payload.tensors, model=lm.identity,
         config={"adapter": adapter.spec.to_dict(), "method": "glora", "objective": "test"})
    return adapter


def test_artifact_round_trip_and_refusals(tmp_path):
    with loaded(TINY) as lm:
        d = lm.identity.d_model
        made = _glora_artifact(lm, tmp_path / "ok", _gate(d, 0.5))
        got = load_adapter(tmp_path / "ok", lm)
        assert isinstance(got, GatedLoraAdapter) and got.gate.threshold == 0.5
        assert all(torch.equal(made.params[k], got.params[k]) for k in made.params)
        assert not any(p.requires_grad for p in got.params.values())
        bad = _gate(d, 0.5)
        bad.mean = torch.zeros(d + 1)
        _glora_artifact(lm, tmp_path / "bad", bad)
        with pytest.raises(ArtifactError, match="gate"):
            load_adapter(tmp_path / "bad", lm)
        with pytest.raises(ValueError, match="before or at the gate"):
            GatedLoraAdapter._build(lm, AdapterSpec("glora", layers=(0, 1)), _gate(d, 0.0))


def test_config_needs_a_gate_for_glora_only(tmp_path):
    with pytest.raises(ValueError, match="gate-probe"):
        UnlearnConfig(forget="hi.jsonl", retain=("en.jsonl",), method="glora")
    with pytest.raises(ValueError, match="gate-probe"):
        UnlearnConfig(forget="hi.jsonl", retain=("en.jsonl",), gate_probe="g")
    with pytest.raises(ValueError, match="glora only"):
        AdapterSpec("lora", layers=(0,), gate_probe="g")


def test_cli_langgate_then_glora_unlearn(tmp_path):
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", t)
             for n, t in (("hi", HI[:8]), ("en", EN[:8]), ("hi_val", HI[8:]), ("en_val", EN[8:]))}
    result = runner.invoke(app, [
        "langgate", "--model", "tiny:llama", "--device", "cpu", "--layer", "0",
        "--positive", str(files["hi"]), "--negative", str(files["en"]),
        "--val-positive", f"hi={files['hi_val']}", "--val-negative", f"en={files['en_val']}",
        "--out", str(tmp_path / "gate")])
    assert result.exit_code == 0, result.output
    art = load(tmp_path / "gate", kind="langgate")
    assert set(art.metrics["val_fired"]["pos"]) == {"hi"}
    assert art.config["inputs"]["positive"]["hi"]["sha256"]
    result = runner.invoke(app, [
        "unlearn", "--model", "tiny:llama", "--device", "cpu", "--method", "glora",
        "--gate-probe", str(tmp_path / "gate"), "--objective", "redirect",
        "--objective-opt", "base=none", "--forget", str(files["hi"]), "--retain",
        str(files["en"]), "--steps", "2", "--max-length", "32", "--out", str(tmp_path / "arm")])
    assert result.exit_code == 0, result.output
    arm = load(tmp_path / "arm", kind="adapter")
    assert arm.config["adapter"]["layers"] == [1, 2, 3]  # every block after the gate's (0)
    assert {p["kind"] for p in arm.manifest["parents"]} == {"langgate"}
    assert set(arm.manifest["tensors"]) == {"gate", "lora"}


def test_relearn_keeps_a_gated_arm_applied_during_the_attack(tmp_path):
    with loaded(TINY) as lm:
        _glora_artifact(lm, tmp_path / "arm", _gate(lm.identity.d_model, 0.0))
    result = relearn_on(tmp_path, tmp_path / "arm", HI)
    assert result.exit_code == 0, result.output
    art = load(tmp_path / "r", kind="relearn")
    assert art.metrics["kept_during_attack"] == ["glora"]
    assert art.config["applied"]["adapter"]["merged"] is False


def test_val_prompt_frac_scores_positive_validation_texts_on_their_prompts(tmp_path, monkeypatch):
    import mmie.edits.langgate as lg
    from mmie.core.data import split_prompt

    seen = {}

    def spy(lm, positive, negative, val_positive, val_negative, config, progress):
        seen.update(pos=val_positive, neg=val_negative)
        raise RuntimeError("stop after the inputs")

    monkeypatch.setattr(lg, "fit_gate", spy)
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", t) for n, t in (("hi", HI), ("en", EN))}
    inputs = {role: {"x": str(files["hi" if "positive" in role else "en"])}
              for role in lg.ROLES}
    with pytest.raises(RuntimeError, match="stop"):
        lg.run(TINY, inputs, tmp_path / "g", LangGateConfig(val_prompt_frac=0.5))
    assert seen["pos"]["x"] == [split_prompt(t, 0.5)[0] for t in HI]
    assert seen["neg"]["x"] == EN  # negatives stay whole: a kept language must never fire
    with pytest.raises(ValueError, match="val_prompt_frac"):
        LangGateConfig(val_prompt_frac=1.0)


def test_unchanged_is_exactly_where_the_gate_never_fires():
    with loaded(TINY) as lm:
        ids = lm.tokenizer([HI[1] + " " + EN[1]], return_tensors="pt")["input_ids"]
        seqs = [ids[0].tolist(), ids[0, :3].tolist()]
        for threshold, expected in ((math.inf, [True, True]), (-math.inf, [False, False])):
            assert _adapter(lm, _gate(lm.identity.d_model, threshold)).unchanged(seqs) == expected
        adapter = _adapter(lm, _halfway_gate(lm, ids))
        got = adapter.unchanged(seqs)
        with torch.no_grad(), gate_live(lm, adapter.gate) as latch:
            for seq, flag in zip(seqs, got, strict=True):
                lm.model(input_ids=torch.tensor([seq]))
                assert flag is not bool(latch.values.any())
        assert got == [False, True]  # fires late in the long text, not in its first 3 tokens


def test_validation_reuses_unchanged_items_and_matches_a_fresh_scoring():
    from mmie.unlearn.validation import ValidationConfig, ValTexts
    from mmie.unlearn.valscore import Scorer

    c = ValidationConfig(forget="f", retain="r", protect=(("en2", "e"),))
    texts = ValTexts(forget=HI[:4], retain=EN[:3], protect={"en2": EN[3:6]})
    with loaded(TINY) as lm:
        gate = _gate(lm.identity.d_model, 0.0, window=2)
        adapter = _adapter(lm, gate)
        cached = Scorer(lm, c, texts, max_length=48, batch_size=2)
        with torch.no_grad():  # threshold: the median item's top window score
            tops = []
            for item in cached.items + cached.retain:
                got = {}
                handle = lm.blocks[0].register_forward_hook(
                    lambda m, a, o, got=got: got.setdefault("h", o[0] if isinstance(o, tuple)
                                                            else o))
                try:
                    lm.model(input_ids=torch.tensor([list(item.ids)]))
                finally:
                    handle.remove()
                tops.append(gate.text_score(got["h"][0, 1:]))
        gate.threshold = float(sorted(tops)[len(tops) // 2])
        cached.measure(adapter)
        fixed = cached.cache["mass"][0] + cached.cache["retain"][0]
        assert any(fixed) and not all(fixed)  # some items reused, some scored again
        with torch.no_grad():
            for p in adapter.params.values():
                p.mul_(3.0)
        again = cached.measure(adapter)
        fresh = Scorer(lm, c, texts, max_length=48, batch_size=2).measure(adapter)
    for key in ("forget_mass", "retain_nll"):
        assert again[key] == pytest.approx(fresh[key], rel=1e-4)
    assert again["own_mass"]["en2"] == pytest.approx(fresh["own_mass"]["en2"], rel=1e-4)
