"""`neurons refine`: the keep rule by hand, each neuron's effect equal to an independent
ablation (its down-projection column zeroed), and the CLI writing a refined mask."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load
from mmie.core.models import ModelSpec, loaded
from mmie.edits.neurons import block_mlps, load_mask
from mmie.neurons.finetune import nll
from mmie.neurons.refine import RefineConfig, keep_rule, measure_effects
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from tests.test_nrows import SELECTED, _mask

TINY = ModelSpec(name="tiny:llama", device="cpu")


def test_keep_rule_by_hand():
    effects = {"hi": torch.tensor([1.0, 1.0, 1.0, -0.1]),
               "ur": torch.tensor([0.2, 0.6, 0.5, -0.5]),
               "pa": torch.tensor([0.0, 0.0, 0.4, -0.5])}
    assert keep_rule(effects, "hi", 0.5, 0.0).tolist() == [True, False, True, False]
    assert keep_rule(effects, "hi", 0.3, 0.0).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="protected"):
        RefineConfig(neurons="m", forget=("hi", "a"), protect=())


def test_each_effect_equals_zeroing_that_neurons_down_column(tmp_path):
    config = RefineConfig(neurons="m", forget=("hi", "a"), protect=(("en", "b"),), n_texts=3,
                          max_length=24, batch_size=2)
    sets = {"hi": HI[:3], "en": EN[:3]}
    with loaded(TINY) as lm:
        _, masks = load_mask(_mask(lm, tmp_path / "mask"), lm.identity)
        effects = measure_effects(lm, masks, sets, config, "mask")
        down = block_mlps(lm, [1])[1].down
        j = SELECTED[1][1]
        with torch.no_grad():
            clean = float(nll(lm, HI[:2], 24)) * 2 + float(nll(lm, HI[2:3], 24))
            saved = down.weight[:, j].clone()
            down.weight[:, j] = 0
            ablated = float(nll(lm, HI[:2], 24)) * 2 + float(nll(lm, HI[2:3], 24))
            down.weight[:, j] = saved
    assert {i for i, e in effects.items() if len(e["hi"])} == set(SELECTED)
    assert len(effects[1]["en"]) == len(SELECTED[1])
    assert float(effects[1]["hi"][1]) == pytest.approx((ablated - clean) / 3, abs=1e-5)
    assert abs(ablated - clean) > 1e-6  # the neuron does something, so the check can fail


def test_cli_refine_writes_a_subset_mask_with_effects(tmp_path):
    with loaded(TINY) as lm:
        _mask(lm, tmp_path / "mask")
    hi, en = write_jsonl(tmp_path / "hi.jsonl", HI[:4]), write_jsonl(tmp_path / "en.jsonl", EN[:4])
    result = CliRunner().invoke(app, [
        "neurons", "refine", "--model", "tiny:llama", "--device", "cpu", "--neurons",
        str(tmp_path / "mask"), "--forget", f"hi={hi}", "--protect", f"en={en}", "--n-texts",
        "2", "--max-length", "16", "--max-ratio", "1000", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    art = load(tmp_path / "r", kind="neurons")
    _, before = load_mask(tmp_path / "mask")
    _, after = load_mask(art)
    assert all(not (after[i] & ~before[i]).any() for i in before)  # a subset of the input
    effects = art.tensors("effects")
    kept_by_rule = keep_rule({"hi": effects["layer1.hi"], "en": effects["layer1.en"]}, "hi",
                             1000, 0.0)
    assert after[1][SELECTED[1]].tolist() == kept_by_rule.tolist()
    assert art.config["refined"] and {p["kind"] for p in art.manifest["parents"]} == {"neurons"}
