"""bf16 decoder-body matmuls (mmie.core.body_precision): close to fp32, restored on exit,
adapters attached inside stay fp32, and `evaluate` records the setting where gate checks it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.body_precision import body_layers, body_precision
from mmie.core.models import ModelSpec, loaded
from mmie.edits.adapters import AdapterSpec, LoraAdapter
from mmie.evaluate.stage import EvalConfig, data_record, read_sets
from mmie.gate.metrics import data_difference
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

from .conftest import EN, HI, write_jsonl


def _logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.fixture
def gemma():
    with loaded(ModelSpec(name="tiny:gemma3", device="cpu")) as lm:
        yield lm


def _ids(lm) -> torch.Tensor:
    return torch.randint(0, lm.model.config.vocab_size, (2, 12), generator=torch.Generator()
                         .manual_seed(1))


def test_fp32_changes_nothing(gemma):
    ids = _ids(gemma)
    plain = _logits(gemma, ids)
    with body_precision(gemma.model, "fp32") as changed:
        assert changed == 0
        assert torch.equal(_logits(gemma, ids), plain)


def test_bf16_is_close_to_fp32_and_restored_on_exit(gemma):
    ids = _ids(gemma)
    plain = _logits(gemma, ids)
    layers = body_layers(gemma.model)
    with body_precision(gemma.model, "bf16") as changed:
        assert changed == len(layers) > 0
        fast = _logits(gemma, ids)
    assert not torch.equal(fast, plain)  # the bf16 path really ran
    error = (fast - plain).abs().max() / plain.abs().max()
    assert error < 2e-2
    assert all("forward" not in vars(layer) for layer in layers)
    assert torch.equal(_logits(gemma, ids), plain)


def test_restored_when_the_block_raises(gemma):
    layers = body_layers(gemma.model)
    with pytest.raises(RuntimeError), body_precision(gemma.model, "bf16"):
        raise RuntimeError("mid-pass")
    assert all("forward" not in vars(layer) for layer in layers)


def test_a_changed_weight_is_cast_again(gemma):
    layer = body_layers(gemma.model)[0]
    x = torch.randn(3, layer.in_features)
    with body_precision(gemma.model, "bf16"), torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2.0)
        after = layer(x)
        layer.weight.div_(2.0)
    torch.testing.assert_close(after, 2 * before, rtol=2e-2, atol=1e-3)


def test_a_graph_gets_the_full_precision_product(gemma):
    layer = body_layers(gemma.model)[0]
    layer.weight.requires_grad_(True)
    x = torch.randn(3, layer.in_features)
    with body_precision(gemma.model, "bf16"):
        out = layer(x)
    assert out.requires_grad and torch.equal(out, F.linear(x, layer.weight, layer.bias))


def test_lora_attached_inside_adds_its_fp32_update(gemma):
    ids = _ids(gemma)
    with body_precision(gemma.model, "bf16"):
        base = _logits(gemma, ids)
        adapter = LoraAdapter.create(gemma, AdapterSpec("lora", layers=(0,), rank=2))
        try:
            lora = [m for n, m in gemma.model.named_modules() if "lora_" in n
                    and isinstance(m, torch.nn.Linear)]
            assert lora and all("forward" not in vars(m) for m in lora)  # the adapter: fp32
            with torch.no_grad():
                for m in lora:
                    m.weight.normal_(0, 0.5)
            adapted = _logits(gemma, ids)
        finally:
            adapter.remove()
        assert not torch.equal(adapted, base)
        assert torch.equal(_logits(gemma, ids), base)


def test_unknown_dtype_is_refused(gemma):
    with pytest.raises(ValueError, match="body dtype"), body_precision(gemma.model, "fp16"):
        pass


# --- evaluate --------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    return {"hi": write_jsonl(tmp_path / "hi.jsonl", HI[:4]),
            "en": write_jsonl(tmp_path / "en.jsonl", EN[:4])}


def _config(files, **kw) -> EvalConfig:
    return EvalConfig(model=ModelSpec(name="tiny:llama", device="cpu"), forget=str(files["hi"]),
                      retain=str(files["en"]), n_prompts=3, max_new_tokens=2, **kw)


def test_eval_config_validates_and_records_the_body_dtype(files):
    with pytest.raises(ValueError, match="body dtype"):
        _config(files, body_dtype="fp16")
    plain, fast = _config(files), _config(files, body_dtype="bf16")
    plain_data = data_record(plain, read_sets(plain))
    fast_data = data_record(fast, read_sets(fast))
    assert "body_dtype" not in plain_data and fast_data["body_dtype"] == "bf16"
    # gate compares the data blocks of the baseline and each arm: a mix is refused
    assert "body_dtype" in data_difference(plain_data, fast_data)
    assert data_difference(fast_data, fast_data) is None


def test_cli_body_dtype_reaches_the_manifest(files, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", "tiny:llama", "--forget", str(files["hi"]),
        "--retain", str(files["en"]), "--n-prompts", "3", "--max-new-tokens", "2",
        "--body-dtype", "bf16", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["body_dtype"] == "bf16"
    assert manifest["config"]["data"]["body_dtype"] == "bf16"
    bad = CliRunner().invoke(app, [
        "evaluate", "--model", "tiny:llama", "--forget", str(files["hi"]),
        "--retain", str(files["en"]), "--body-dtype", "fp8", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "body dtype" in bad.output


def test_a_baseline_of_another_body_dtype_gives_no_perplexity_ratio(files, tmp_path):
    from mmie.evaluate.stage import run

    base = run(_config(files), tmp_path / "base")
    same = run(_config(files, baseline=str(tmp_path / "base")), tmp_path / "same")
    other = run(_config(files, body_dtype="bf16", baseline=str(tmp_path / "base")),
                tmp_path / "other")
    assert base.metrics["retain_nll"]["value"] is not None
    assert same.metrics["retain_ppl_ratio"]["value"] == 1.0
    assert other.metrics["retain_ppl_ratio"]["value"] is None
    assert "--body-dtype" in other.metrics["retain_ppl_ratio"]["missing"]
