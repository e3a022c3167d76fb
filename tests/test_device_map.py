"""Models split across devices (``device_map``): same results as the unsplit model.

On the CPU, blocks are offloaded to disk: accelerate keeps their weights out of the module
(on ``meta``) and brings them in for each forward, which is what a GPU run with
``--max-memory 0=...,cpu=...`` does to the blocks it places on the CPU. Every stage that sits on
a block (harvest, select-layers, SAE gate, script scrub, ReFT, evaluate) must follow the
block's execution device, never its parameters' device. The GPU test splits between cuda:0
and the CPU for real.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module
from torch import nn
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.activations import harvest
from mmie.core.artifacts import save
from mmie.core.errors import ModelError
from mmie.core.losses import head_params, token_logprobs
from mmie.core.models import (
    ModelSpec,
    get_decoder,
    lm_head,
    loaded,
    materialized,
    module_device,
    parse_max_memory,
    unwrap,
)
from mmie.edits.adapters import AdapterSpec, ReftAdapter
from mmie.edits.interventions import ScrubConfig, attached, fit_scrub
from mmie.evaluate.stage import EvalConfig
from mmie.evaluate.stage import run as run_eval
from mmie.layers.stage import SelectLayersConfig
from mmie.layers.stage import run as run_select
from mmie.sae.modules import SaeConfig, build_sae
from mmie.train_sae.stage import TrainSaeConfig
from mmie.train_sae.stage import run as run_sae
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

# tiny models take ~215 KB in float32: embeddings and blocks 0-1 fit, blocks 2-3 go to disk
CPU_CAP = {"cpu": "150KB"}
IDS = torch.tensor([[1, 80, 81, 82, 83, 84, 85, 86], [0, 0, 1, 90, 91, 92, 93, 94]])
MASK = (IDS != 0).long()
ALL = [0, 1, 2, 3]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")




def split_spec(plain: ModelSpec, folder: Path, cap=None) -> ModelSpec:
    return replace(plain, device_map="sequential", max_memory=cap or CPU_CAP,
                   offload_dir=str(folder))


def offloaded(lm) -> list[int]:
    return [i for i, b in enumerate(lm.blocks) if next(b.parameters()).device.type == "meta"]


def body_out(lm) -> torch.Tensor:
    with torch.no_grad():
        return get_decoder(lm.model)(input_ids=IDS.to(lm.device),
                                     attention_mask=MASK.to(lm.device)).last_hidden_state.cpu()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


# --- spec, parsing, where a module computes -----------------------------------------------------

def test_spec_accepts_the_device_maps_transformers_knows(tmp_path):
    for name in ("auto", "balanced", "balanced_low_0", "sequential"):
        assert ModelSpec(device_map=name).device_map == name
    with pytest.raises(ValueError, match="device_map 'everywhere' not in auto"):
        ModelSpec(device_map="everywhere")
    with pytest.raises(ValueError, match="need a device_map"):
        ModelSpec(max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="need a device_map"):
        ModelSpec(offload_dir=str(tmp_path))
    spec = ModelSpec(device_map="auto", max_memory={"0": "2GiB", "cpu": "1000"})
    assert spec.memory_limits() == {0: "2GiB", "cpu": 1000}  # what accelerate expects


def test_parse_max_memory():
    assert parse_max_memory("0=2GiB, cpu=20GiB") == {"0": "2GiB", "cpu": "20GiB"}
    assert parse_max_memory("cuda:1=500MB,disk=1000GB") == {"1": "500MB", "disk": "1000GB"}


@pytest.mark.parametrize("text,message", [
    ("", "empty"), ("cpu", "not DEVICE=SIZE"), ("gpu=1GB", "not a GPU index"),
    ("cpu=lots", "not bytes or a size"), ("cpu=0GB", "not bytes or a size"),
    ("0=1GB,cuda:0=2GB", "twice")])
def test_parse_max_memory_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_max_memory(text)


def test_module_device_follows_the_hook_not_the_parameters():
    block = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    assert module_device(block) == torch.device("cpu")
    # offloaded as dispatch_model does it: weights to meta, the hook brings them in
    add_hook_to_module(block[1], AlignDevicesHook(execution_device="cpu", offload=True,
                                                  weights_map=block[1].state_dict()))
    assert block[1].weight.device.type == "meta"
    assert module_device(block[1]) == torch.device("cpu")
    block[0].to("meta")
    assert module_device(block) == torch.device("cpu")  # a submodule's hook decides
    block._hf_hook = SequentialHook(AlignDevicesHook(execution_device=None),
                                    AlignDevicesHook(execution_device="cuda:1"))
    assert module_device(block) == torch.device("cuda:1")  # the block's own hook first
    bare = nn.Linear(2, 2).to("meta")
    with pytest.raises(ModelError, match="cannot tell where Linear computes"):
        module_device(bare)
    assert module_device(bare, default=torch.device("cpu")) == torch.device("cpu")


# --- a tiny model with blocks offloaded to disk, against the same model unsplit ------------------

@pytest.fixture(scope="module", params=["llama", "gemma3"])
def pair(request, tmp_path_factory):
    plain = ModelSpec(name=f"tiny:{request.param}", device="cpu")
    split = split_spec(plain, tmp_path_factory.mktemp("offload"))
    with loaded(plain) as a, loaded(split) as b:
        yield a, b


def test_split_offloads_blocks_and_keeps_outputs(pair):
    plain, split = pair
    assert "disk" in split.model.hf_device_map.values()
    assert offloaded(split) == [2, 3] and offloaded(plain) == []
    assert [split.block_device(i) for i in ALL] == [torch.device("cpu")] * 4
    assert split.identity == plain.identity  # same model, wherever it sits
    torch.testing.assert_close(body_out(split), body_out(plain), rtol=0, atol=1e-6)


def test_materialized_head_gives_the_unsplit_logprobs(pair):
    plain, split = pair
    hidden, labels = torch.randn(2, 5, 32), torch.randint(0, 200, (2, 5))
    want = token_logprobs(hidden, labels=labels, **head_params(unwrap(plain.model)))
    head = lm_head(split.model)
    with materialized(head):  # read directly, an offloaded head's weight would be meta
        assert head.weight.device == module_device(head)
        got = token_logprobs(hidden, labels=labels, **head_params(unwrap(split.model)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert head.weight.device.type == ("cpu" if "gemma3" in split.identity.name else "meta")


def test_harvest_equal(pair):
    plain, split = pair
    kw = dict(batch_size=5, token_sample=64, seed=2, max_length=24)
    a, b = harvest(plain, HI + EN, ALL, **kw), harvest(split, HI + EN, ALL, **kw)
    assert max_diff(a.pooled, b.pooled) <= 1e-6 and max_diff(a.tokens, b.tokens) <= 1e-6
    assert torch.equal(a.token_text, b.token_text) and torch.equal(a.n_tokens, b.n_tokens)


def _sae_artifact(lm, layer: int, out: Path) -> Path:
    cfg = SaeConfig(d_model=32, expansion=2, k=4)
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, idx = sae.encode(harvest(lm, HI[:4], [layer], token_sample=64).tokens[layer])
    firing = sorted(set(idx.flatten().tolist()))[:3]
    return save(out, "sae", tensors={f"layer{layer}": sae.state_dict()},
                config={"sae": asdict(cfg), "layers": [layer]}, model=lm.identity,
                metrics={"selected": {str(layer): firing}}).path


def test_sae_gate_and_scrub_equal_on_offloaded_blocks(pair, tmp_path):
    plain, split = pair
    sae = _sae_artifact(plain, 3, tmp_path / "sae")
    scrubs = [fit_scrub(lm, HI, EN, [2], tmp_path / name, config=ScrubConfig(max_length=16))
              for name, lm in (("a", plain), ("b", split))]
    assert max_diff(scrubs[0].tensors("scrub"), scrubs[1].tensors("scrub")) <= 1e-6
    outs = []
    for lm in (plain, split):
        before = body_out(lm)
        with attached(lm, sae=sae, sae_gate_strength=0.0, scrub=scrubs[0].path):
            outs.append(body_out(lm))
        assert not torch.allclose(outs[-1], before)
        assert torch.equal(body_out(lm), before)  # all removed
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)


def test_reft_modules_sit_where_the_block_computes(pair):
    _, split = pair
    adapter = ReftAdapter.create(split, AdapterSpec(method="reft", layers=(1, 3)))
    assert {p.device.type for p in adapter.modules.parameters()} == {"cpu"}  # not meta
    with adapter.edits():
        body_out(split)


def test_select_layers_equal(tmp_path):
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", t) for n, t in (("hi", HI), ("en", EN))}
    langs = (("hi", str(files["hi"])), ("en", str(files["en"])))
    config = SelectLayersConfig(forget=str(files["hi"]), retain=str(files["en"]), folds=3,
                                max_length=24, langs=langs, token_sample=16,
                                model=ModelSpec(name="tiny:llama", device="cpu"))
    a = run_select(config, tmp_path / "a")
    b = run_select(replace(config, model=split_spec(config.model, tmp_path / "off")),
                   tmp_path / "b")
    assert a.metrics["chosen"] == b.metrics["chosen"]
    assert a.metrics["lape"]["counts"] == b.metrics["lape"]["counts"]
    for row_a, row_b in zip(a.metrics["layers"], b.metrics["layers"], strict=True):
        for key, value in row_a.items():
            if isinstance(value, float):
                assert row_b[key] == pytest.approx(value, abs=1e-6), key
            else:
                assert row_b[key] == value, key
    assert max_diff(a.tensors("pooled"), b.tensors("pooled")) <= 1e-6


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]


def test_evaluate_equal(tmp_path):
    hi, en = write_jsonl(tmp_path / "hi.jsonl", HI[:6]), write_jsonl(tmp_path / "en.jsonl", EN[:6])
    config = EvalConfig(model=ModelSpec(name="tiny:llama", device="cpu"), forget=str(hi),
                        retain=str(en), n_prompts=4, max_new_tokens=4, batch_size=4)
    run_eval(config, tmp_path / "a")
    run_eval(replace(config, model=split_spec(config.model, tmp_path / "off")), tmp_path / "b")
    a, b = _samples(tmp_path / "a"), _samples(tmp_path / "b")
    assert [s["generation"] for s in a] == [s["generation"] for s in b]
    assert [s["fluency_nll"] for s in b] == pytest.approx([s["fluency_nll"] for s in a],
                                                          abs=1e-5)


def test_train_sae_equal(tmp_path):
    """The harvest and the held-out CE passes (which read the LM head's matrix) on offloaded
    blocks: same SAEs and same CE metrics as the unsplit model."""
    hi, en = write_jsonl(tmp_path / "hi.jsonl", HI), write_jsonl(tmp_path / "en.jsonl", EN)
    config = TrainSaeConfig(forget=str(hi), retain=str(en), layers=(2, 3), expansion=4, k=8,
                            tokens=320, batch_tokens=64, buffer_tokens=128, holdout=0.25,
                            top_n_features=3, n_contexts=2,
                            model=ModelSpec(name="tiny:llama", device="cpu"))
    a = run_sae(config, tmp_path / "a")
    b = run_sae(replace(config, model=split_spec(config.model, tmp_path / "off")), tmp_path / "b")
    for stem in ("layer2", "layer3"):
        assert max_diff(a.tensors(stem), b.tensors(stem)) <= 1e-6
    for layer in ("2", "3"):
        qa, qb = a.metrics["layers"][layer], b.metrics["layers"][layer]
        for key in ("ce_clean", "ce_sae", "ce_ablated"):
            assert qb[key] == pytest.approx(qa[key], rel=1e-5), (layer, key)


def test_cli_device_options():
    runner = CliRunner()
    got = runner.invoke(app, ["model", "info", "tiny:llama", "--device-map", "auto",
                              "--max-memory", "cpu=1GiB", "--json"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["block_devices"] == "0-3 cpu"
    bad = runner.invoke(app, ["select-layers", "-m", "tiny:llama", "--forget", "x", "--retain",
                              "y", "--out", "z", "--device-map", "auto", "--max-memory",
                              "gpu=2GiB"])
    assert bad.exit_code == 2 and "not a GPU index" in bad.output
    lone = runner.invoke(app, ["model", "info", "tiny:llama", "--max-memory", "cpu=1GiB"])
    assert lone.exit_code == 2 and "need a device_map" in lone.output


# --- a real split: cuda:0 and the CPU ---------------------------------------------------------

@pytest.mark.gpu
@gpu
def test_split_between_cuda_and_cpu_matches_unsplit(tmp_path):
    """Blocks on 'cpu' next to a GPU are offloaded and computed on cuda:0 (accelerate)."""
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", t) for n, t in (("hi", HI), ("en", EN))}
    plain = ModelSpec(name="tiny:llama", device="cuda", dtype="float32")
    split = replace(plain, device_map="sequential", max_memory={"0": "120KB", "cpu": "1GiB"})
    with loaded(plain) as a, loaded(split) as b:
        assert set(b.model.hf_device_map.values()) == {0, "cpu"}
        assert offloaded(b), "some blocks should sit on the CPU"
        assert {b.block_device(i).type for i in ALL} == {"cuda"}  # offloaded ones too
        kw = dict(batch_size=5, token_sample=64, seed=2, max_length=24)
        ha, hb = harvest(a, HI + EN, ALL, **kw), harvest(b, HI + EN, ALL, **kw)
        assert max_diff(ha.pooled, hb.pooled) <= 1e-5 and max_diff(ha.tokens, hb.tokens) <= 1e-5
        sae = _sae_artifact(a, offloaded(b)[0], tmp_path / "sae")
        outs = []
        for lm in (a, b):
            with attached(lm, sae=sae, sae_gate_strength=0.0):
                outs.append(body_out(lm))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    select = SelectLayersConfig(forget=str(files["hi"]), retain=str(files["en"]), folds=3,
                                max_length=24, model=plain)
    sa, sb = (run_select(replace(select, model=m), tmp_path / n)
              for n, m in (("sa", plain), ("sb", split)))
    assert sa.metrics["chosen"] == sb.metrics["chosen"]
    for row_a, row_b in zip(sa.metrics["layers"], sb.metrics["layers"], strict=True):
        assert row_b["probe_auc"] == pytest.approx(row_a["probe_auc"], abs=1e-4)
        assert row_b["debiased_cka"] == pytest.approx(row_a["debiased_cka"], abs=1e-4)
    evaluate = EvalConfig(model=plain, forget=str(files["hi"]), retain=str(files["en"]),
                          n_prompts=4, max_new_tokens=6, batch_size=4)
    run_eval(evaluate, tmp_path / "ea")
    run_eval(replace(evaluate, model=split), tmp_path / "eb")
    ea, eb = _samples(tmp_path / "ea"), _samples(tmp_path / "eb")
    assert [s["generation"] for s in ea] == [s["generation"] for s in eb]
