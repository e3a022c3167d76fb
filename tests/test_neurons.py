"""mmie neurons: Wanda / LAPE scores, selection, frozen-neuron fine-tuning, compare, ablation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.activations import real_token_mask, tokenize
from mmie.core.artifacts import ModelIdentity, load, save
from mmie.core.errors import ArtifactError, ModelError
from mmie.core.hooks import HookSpec, hooked
from mmie.core.models import LoadedModel, ModelSpec, identity_of, loaded, resolve_blocks
from mmie.core.progress import SILENT
from mmie.edits.neurons import ablated, mask_tensors, resolve_layout
from mmie.neurons.compare import CompareConfig, dynamics, permutation_pvalue, run_compare, verdict
from mmie.neurons.finetune import (
    MODES,
    FinetuneConfig,
    applied,
    gradient_masks,
    masked_params,
    run_finetune,
    trainable,
)
from mmie.neurons.scores import (
    NeuronStats,
    collect,
    lape_entropy,
    lape_masks,
    score_tensors,
    wanda_columns,
    wanda_rows,
)
from mmie.neurons.stage import Scope, SelectConfig, run_select, top_share
from tests.conftest import EN, HI

runner = CliRunner()
TINY = ModelSpec(name="tiny:llama", device="cpu")


@pytest.fixture(scope="module")
def lm():
    with loaded(TINY) as handle:
        yield handle


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _mask_artifact(path, identity, frozen: dict[int, list[int]], width: int = 64):
    masks = {i: torch.zeros(width, dtype=torch.bool) for i in range(identity.n_layers)}
    for i, idx in frozen.items():
        masks[i][idx] = True
    return save(path, "neurons", tensors=mask_tensors(masks), config={"role": "mask"},
                model=identity)


# --- scores -----------------------------------------------------------------------------------

def test_wanda_formulas_on_hand_matrices():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    sumsq = torch.tensor([4.0, 9.0])
    # columns: (|1| + |3|) * 2 = 8, (|-2| + 0) * 3 = 6; rows: 1*2 + 2*3 = 8, 3*2 + 0 = 6
    assert torch.equal(wanda_columns(w, sumsq), torch.tensor([8.0, 6.0]))
    assert torch.equal(wanda_rows(w, sumsq), torch.tensor([8.0, 6.0]))


def test_scores_match_a_hand_computation(lm):
    down = lm.blocks[1].mlp.down_proj
    original = down.weight.detach().clone()
    grid = torch.arange(down.weight.numel(), dtype=torch.float32).reshape(down.weight.shape)
    captured = {}
    hooks = [HookSpec(down, lambda m, a: captured.__setitem__("x", a[0]), pre=True),
             HookSpec(lm.blocks[1].mlp, lambda m, a: captured.__setitem__("h", a[0]), pre=True),
             HookSpec(lm.blocks[1].mlp.act_fn, lambda m, a, o: captured.__setitem__("act", o))]
    try:
        with torch.no_grad():
            down.weight.copy_((grid % 7 - 3) / 4)  # hand-set: values -0.75 .. 0.75
        got = score_tensors(lm, collect(lm, HI[:1], [1], batch_size=1), [1])
        enc = tokenize(lm, HI[:1], 128)
        keep = real_token_mask(lm, enc)[0]
        with hooked(hooks), torch.no_grad():
            lm.model(**enc)
        x, h, act = (captured[k][0][keep] for k in ("x", "h", "act"))
        expected = ((grid % 7 - 3) / 4).abs().sum(0) * x.square().sum(0).sqrt()
        up = lm.blocks[1].mlp.up_proj.weight
        expected_up = (up.abs() * h.square().sum(0).sqrt()).sum(1)
    finally:
        with torch.no_grad():
            down.weight.copy_(original)
    assert keep.sum() == len(enc["input_ids"][0]) - 1  # BOS left out
    torch.testing.assert_close(got["layer1.wanda"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["layer1.up_proj.rows"], expected_up, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["layer1.act_prob"], (act > 0).float().mean(0))


def _gpt2_lm() -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmie.core.tiny import build_tokenizer

    tok = build_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=24,
                                       vocab_size=len(tok) + 4, bos_token_id=1, eos_token_id=2))
    model.eval()
    blocks = resolve_blocks(model)
    return LoadedModel(model, tok, identity_of("gpt2", model, {}, len(blocks)), blocks, TINY)


def test_gpt2_conv1d_is_transposed():
    lm = _gpt2_lm()
    assert resolve_layout(lm.blocks[0]).name == "gpt2"
    stats = collect(lm, EN[:2], [1], batch_size=2)
    got = score_tensors(lm, stats, [1])
    weight = lm.blocks[1].mlp.c_proj.weight.detach()  # Conv1D: [in=24, out=16]
    expected = weight.abs().sum(1) * stats.sumsq[1].float().sqrt()
    torch.testing.assert_close(got["layer1.wanda"], expected)
    assert got["layer1.c_fc.rows"].shape == (24,)


def test_unknown_mlp_layout_names_the_modules():
    block = nn.Module()
    block.ffn = nn.Module()
    block.ffn.wo = nn.Linear(4, 4)
    with pytest.raises(ModelError, match="ffn.wo"):
        resolve_layout(block)


def test_peft_wrapped_scores_equal_plain(lm):
    from peft import LoraConfig, get_peft_model

    layers = [0, 2]
    plain = score_tensors(lm, collect(lm, HI[:6], layers, batch_size=4), layers)
    config = LoraConfig(r=4, target_modules=["down_proj", "up_proj", "gate_proj", "q_proj"])
    wrapped = get_peft_model(lm.model, config)  # B = 0: the zero-init LoRA is a no-op
    try:
        zero = score_tensors(lm, collect(lm, HI[:6], layers, batch_size=4), layers)
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    param.normal_()
        live = score_tensors(lm, collect(lm, HI[:6], layers, batch_size=4), layers)
        merged = lm.blocks[2].mlp.down_proj.get_delta_weight("default") + \
            lm.blocks[2].mlp.down_proj.base_layer.weight
    finally:
        wrapped.unload()
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    # a trained LoRA is scored with W + BA, the weight its forward pass applies
    ratio = live["layer2.wanda"] / live["layer2.act_norm"]
    torch.testing.assert_close(ratio, merged.detach().abs().sum(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(live["layer2.wanda"], plain["layer2.wanda"])


def test_hooks_removed_after_an_exception(lm, monkeypatch):
    def boom(self, store, mask):
        raise RuntimeError("boom")

    monkeypatch.setattr(NeuronStats, "add", boom)
    with pytest.raises(RuntimeError, match="boom"):
        collect(lm, HI[:2], [0, 1])
    mlp = lm.blocks[0].mlp
    assert all(_no_hooks(m) for m in (mlp, mlp.down_proj, mlp.act_fn, lm.blocks[1]))


# --- selection --------------------------------------------------------------------------------

def test_top_share_per_layer_and_global():
    scores = {0: torch.tensor([1.0, 5.0, 3.0, 2.0]), 1: torch.tensor([9.0, 0.0, 8.0, 7.0])}
    ties = top_share({0: torch.tensor([1.0, 2.0, 2.0, 2.0])}, 0.5, Scope.LAYER)
    assert ties[0].tolist() == [False, True, True, False]  # ties go to the lower index
    per_layer = top_share(scores, 0.25, Scope.LAYER)  # ceil(0.25 * 4) = 1 per layer
    assert per_layer[0].tolist() == [False, True, False, False]
    assert per_layer[1].tolist() == [True, False, False, False]
    glob = top_share(scores, 0.25, Scope.GLOBAL)  # ceil(0.25 * 8) = 2 overall: 9 and 8
    assert glob[0].tolist() == [False] * 4 and glob[1].tolist() == [True, False, True, False]


def test_lape_masks_on_hand_probabilities():
    prob = torch.tensor([[0.9, 0.5, 0.0, 0.5, 0.01],    # hi
                         [0.0, 0.5, 0.9, 0.4, 0.01]])   # en
    entropy = lape_entropy(prob)
    assert entropy[0] == 0 and entropy[2] == 0 and float(entropy[1]) == pytest.approx(math.log(2))
    masks = lape_masks(prob, quantile=0.4, threshold=0.3)  # 2 lowest-entropy candidates
    assert masks[0].tolist() == [True, False, False, False, False]
    assert masks[1].tolist() == [False, False, True, False, False]
    never = lape_entropy(torch.zeros(2, 1))
    assert math.isinf(never[0])


def _score_artifact(path, identity, wanda: dict[int, torch.Tensor], data="d"):
    tensors = {"scores": {f"layer{i}.{q}": t.clone() for i, t in wanda.items()
                          for q in ("wanda", "act_prob")}}
    return save(path, "neurons", tensors=tensors, model=identity,
                config={"role": "scores", "data_sha256": data, "max_length": 128})


IDENT = ModelIdentity("synthetic", "Synthetic", 2, 8, 10, {"weights_sha256": "ab"})


def test_diff_selection_is_a_set_difference(tmp_path):
    target = _score_artifact(tmp_path / "t", IDENT, {0: torch.tensor([4.0, 3, 2, 1]),
                                                     1: torch.tensor([1.0, 2, 3, 4])})
    ref = _score_artifact(tmp_path / "r", IDENT, {0: torch.tensor([4.0, 0.1, 0.3, 0.2]),
                                                  1: torch.tensor([0.3, 0.1, 0.2, 4])})
    art = run_select(SelectConfig(target=str(target.path), reference=str(ref.path), top=0.5),
                     tmp_path / "mask")
    masks = art.tensors("mask")
    assert masks["layer0.selected"].tolist() == [False, True, False, False]
    assert masks["layer1.selected"].tolist() == [False, False, True, False]
    assert {int(k): v for k, v in art.metrics["per_layer"].items()} == {0: 1, 1: 1}
    assert art.metrics["selected"] == 2


def test_select_refuses_another_model(tmp_path):
    target = _score_artifact(tmp_path / "t", IDENT, {0: torch.ones(4)})
    other = ModelIdentity("other", "Synthetic", 2, 8, 10, {"weights_sha256": "cd"})
    ref = _score_artifact(tmp_path / "r", other, {0: torch.ones(4)})
    with pytest.raises(ArtifactError, match="another base model"):
        run_select(SelectConfig(target=str(target.path), reference=str(ref.path)), tmp_path / "m")


# --- compare ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change, expected", [(-0.2, "A"), (-0.11, "A"), (-0.1, "inconclusive"),
                                              (-0.049, "B"), (0.0, "B"), (0.04, "B"),
                                              (0.05, "inconclusive"), (0.3, "inconclusive")])
def test_verdict_thresholds(change, expected):
    assert verdict(change, drift=0.10, stable=0.05) == expected


@pytest.mark.parametrize("factor, expected", [(0.7, "A"), (1.02, "B"), (0.93, "inconclusive")])
def test_compare_verdict_on_synthetic_scores(tmp_path, factor, expected):
    gen = torch.Generator().manual_seed(0)
    before = {i: torch.rand(50, generator=gen) + 0.5 for i in range(2)}
    frozen = {0: list(range(10)), 1: list(range(5))}
    after = {i: b.clone() for i, b in before.items()}
    for i, idx in frozen.items():
        after[i][idx] *= factor
    b = _score_artifact(tmp_path / "b", IDENT, before)
    a = _score_artifact(tmp_path / "a", IDENT, after)
    _mask_artifact(tmp_path / "m", IDENT, frozen, width=50)
    art = run_compare(CompareConfig(before=str(b.path), after=str(a.path),
                                    neurons=str(tmp_path / "m"), n_perm=200), tmp_path / "c")
    m = art.metrics
    assert m["verdict"] == expected
    assert math.isclose(m["frozen_mean_change"], factor - 1, rel_tol=1e-5)
    assert m["frozen"]["change"]["n"] == 15 and m["other"]["change"]["mean"] == 0
    for png in ("hist_scores.png", "hist_change.png"):
        assert (art.path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = load(art.path, kind="neurons")
    assert reloaded.tensors("change")["layer0.change"][0] == pytest.approx(factor - 1)


def test_compare_refuses_scores_of_other_texts(tmp_path):
    b = _score_artifact(tmp_path / "b", IDENT, {0: torch.ones(4)}, data="one")
    a = _score_artifact(tmp_path / "a", IDENT, {0: torch.ones(4)}, data="two")
    _mask_artifact(tmp_path / "m", IDENT, {0: [1]}, width=4)
    with pytest.raises(ArtifactError, match="data_sha256"):
        run_compare(CompareConfig(before=str(b.path), after=str(a.path),
                                  neurons=str(tmp_path / "m")), tmp_path / "c")


def test_dynamics_tests_and_permutation_pvalue():
    before = torch.ones(200)
    after = torch.cat([torch.full((20,), 0.5), torch.ones(180)])
    frozen = torch.arange(200) < 20
    m = dynamics(before, after, frozen, CompareConfig(before="b", after="a", neurons="n",
                                                      n_perm=500))
    assert m["perm"]["p"] == pytest.approx(1 / 501) and m["mann_whitney"]["p"] < 1e-6
    same = permutation_pvalue(torch.rand(30).numpy(), torch.rand(300).numpy(), 300, 1)
    assert same > 0.01
    with pytest.raises(ValueError, match="stable <= drift"):
        CompareConfig(before="b", after="a", neurons="n", drift=0.05, stable=0.1)


# --- fine-tuning ------------------------------------------------------------------------------

def test_full_finetune_freezes_neurons_bit_identically(tmp_path, text_files):
    frozen = {0: [0, 5, 9], 2: [1, 63]}
    with loaded(TINY) as base:
        mask = _mask_artifact(tmp_path / "mask", base.identity, frozen)
        original = {k: p.detach().clone() for k, p in base.blocks.state_dict().items()}
    art = run_finetune(FinetuneConfig(model=TINY, neurons=str(mask.path),
                                      data=str(text_files["en"]), steps=3, lr=1e-2,
                                      batch_size=4), tmp_path / "ft")
    weights = art.tensors("weights")
    assert sorted({k.split(".")[0] for k in weights}) == ["layer0", "layer2"]
    assert art.metrics["frozen_bit_identical"] is True and art.metrics["n_frozen"] == 5
    for i, idx in frozen.items():
        down = weights[f"layer{i}.mlp.down_proj.weight"]
        up = weights[f"layer{i}.mlp.up_proj.weight"]
        assert torch.equal(down[:, idx], original[f"{i}.mlp.down_proj.weight"][:, idx])
        assert torch.equal(up[idx], original[f"{i}.mlp.up_proj.weight"][idx])
        others = [j for j in range(64) if j not in idx]
        changed = (down[:, others] != original[f"{i}.mlp.down_proj.weight"][:, others]).any(0)
        assert changed.all()
    with loaded(TINY) as base:
        with applied(base, art.path):
            inside = base.blocks[0].mlp.down_proj.weight.detach().clone()
        after = base.blocks[0].mlp.down_proj.weight.detach()
    assert torch.equal(inside, weights["layer0.mlp.down_proj.weight"])
    assert torch.equal(after, original["0.mlp.down_proj.weight"])


def test_lora_finetune_leaves_the_base_unchanged(tmp_path):
    with loaded(TINY) as lm:
        masks = {i: torch.zeros(64, dtype=torch.bool) for i in range(lm.n_layers)}
        masks[1][[3, 4]] = True
        base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        params = {n: p for n, p in lm.model.named_parameters()}
        config = FinetuneConfig(model=TINY, neurons="m", data="d", lora=True, steps=3, lr=1e-2,
                                target_modules=("q_proj", "v_proj", "down_proj"))
        torch.manual_seed(0)
        with MODES["lora"](lm, masks, EN, config, SILENT) as trained:
            lora = {n: p for n, p in lm.model.named_parameters() if "lora_B" in n}
            assert lora and all(p.abs().sum() > 0 for p in lora.values())  # B left zero init
            assert all(torch.equal(params[n], base[n]) for n in base)
            assert trained.kind == "adapter" and trained.metrics["lora_touches_mlp"] == [
                "down_proj"]
        assert not any("lora" in n for n, _ in lm.model.named_parameters())
    assert trained.losses[-1] < trained.losses[0]


def test_gradient_masks_zero_frozen_entries_and_are_removed(lm):
    masks = {0: torch.zeros(64, dtype=torch.bool)}
    masks[0][[2, 7]] = True
    pairs = list(masked_params(lm, masks, "test").values())
    param, keep = pairs[-1]  # down_proj.weight: columns are neurons
    assert keep.shape == (1, 64)
    with trainable([p for p, _ in pairs]):
        try:
            with pytest.raises(RuntimeError, match="inside"), gradient_masks(pairs):
                (param * torch.ones_like(param)).sum().backward()
                assert param.grad[:, [2, 7]].abs().sum() == 0
                assert param.grad[:, 0].abs().sum() > 0
                raise RuntimeError("inside")
            param.grad = None
            (param * torch.ones_like(param)).sum().backward()
            assert param.grad[:, 2].abs().sum() > 0  # hook gone after the exception
        finally:
            param.grad = None
    assert not param.requires_grad


# --- ablation ---------------------------------------------------------------------------------

def test_ablated_scales_selected_activations(lm, tmp_path):
    mask = _mask_artifact(tmp_path / "mask", lm.identity, {1: [0, 1, 2]})
    down, seen = lm.blocks[1].mlp.down_proj, {}
    record = HookSpec(down, lambda m, a: seen.__setitem__("x", a[0].clone()), pre=True)
    enc = tokenize(lm, EN[:1], 64)
    with torch.no_grad():
        plain = lm.model(**enc).logits
        with ablated(lm, mask.path, 0.0), hooked([record]):  # runs after the ablation hook
            lm.model(**enc)
        with ablated(lm, mask.path, 1.0):
            same = lm.model(**enc).logits
    assert seen["x"][..., :3].abs().sum() == 0 and seen["x"][..., 3:].abs().sum() > 0
    assert torch.equal(plain, same)
    with pytest.raises(KeyError), ablated(lm, mask.path, 0.0):
        raise KeyError("inside")
    assert _no_hooks(down)


# --- CLI --------------------------------------------------------------------------------------

def _ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_cli_all_subcommands(tmp_path, text_files):
    hi, en, d = str(text_files["hi"]), str(text_files["en"]), tmp_path
    tiny = ["-m", "tiny:llama", "--device", "cpu"]
    _ok(["neurons", "score", *tiny, "--data", hi, "--lang", f"hi={hi}", "--lang", f"en={en}",
         "-o", str(d / "hi")])
    _ok(["neurons", "score", *tiny, "--data", en, "-o", str(d / "en"), "--layers", "0-3"])
    _ok(["neurons", "select", "--target", str(d / "hi"), "--reference", str(d / "en"),
         "--top", "5%", "-o", str(d / "mask")])
    _ok(["neurons", "select", "--lape", "--target", str(d / "hi"), "--lape-quantile", "0.2",
         "-o", str(d / "lape")])
    _ok(["neurons", "finetune", *tiny, "--neurons", str(d / "mask"), "--data", en, "--lora",
         "--steps", "2", "-o", str(d / "ft")])
    _ok(["neurons", "score", *tiny, "--data", hi, "--lang", f"hi={hi}", "--lang", f"en={en}",
         "--adapter", str(d / "ft"), "-o", str(d / "hi-after")])
    result = _ok(["neurons", "compare", "--before", str(d / "hi"), "--after", str(d / "hi-after"),
                  "--neurons", str(d / "mask"), "--n-perm", "100", "-o", str(d / "cmp")])
    assert "verdict:" in result.output
    result = _ok(["neurons", "ablate", *tiny, "--neurons", str(d / "mask"), "--prompt", "The",
                  "--max-new-tokens", "4", "-o", str(d / "abl")])
    assert "before:" in result.output
    assert load(d / "abl", kind="neurons").config["role"] == "ablation"
    bad = runner.invoke(app, ["neurons", "select", "--target", str(d / "hi"), "--reference",
                              str(d / "en"), "--top", "300%", "-o", str(d / "x")])
    assert bad.exit_code == 2
    wrong = runner.invoke(app, ["neurons", "compare", "--before", str(d / "hi"), "--after",
                                str(d / "en"), "--neurons", str(d / "mask"), "-o", str(d / "y")])
    assert wrong.exit_code == 1 and "scored differently" in " ".join(wrong.output.split())
