"""train-sae: training, resume, activation cache, quality metrics, features, load_sae, export."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load, save
from mmie.core.errors import ArtifactError, DataError
from mmie.core.models import ModelSpec, loaded
from mmie.core.progress import SILENT
from mmie.sae.modules import SaeConfig, build_sae
from mmie.train_sae import stream as sae_stream
from mmie.train_sae.export import export_saelens, load_sae, load_saes
from mmie.train_sae.features import (
    FeatureSettings,
    analyse,
    ce_recovered,
    heldout_pass,
    latent_scores,
    selectivity,
)
from mmie.train_sae.optim import metrics
from mmie.train_sae.stage import TrainSaeConfig, default_checkpoint_dir, run, split_sets
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import StopAfter

TINY = ModelSpec(name="tiny:llama", device="cpu")
FAST = dict(model=TINY, expansion=4, k=8, tokens=640, batch_tokens=64, buffer_tokens=256,
            holdout=0.25, top_n_features=3, n_contexts=2, checkpoint_every=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"hi": write_jsonl(root / "hi.jsonl", HI), "en": write_jsonl(root / "en.jsonl", EN),
            "root": root}


def _config(data, **over) -> TrainSaeConfig:
    return TrainSaeConfig(forget=str(data["hi"]), retain=str(data["en"]),
                          **{"layers": (1, 2), **FAST, **over})


@pytest.fixture(scope="module")
def trained(data):
    """One cached run with gradient attribution, shared by the read-only tests."""
    config = _config(data, cache_dir=str(data["root"] / "cache"), grad_attribution=True)
    return config, run(config, data["root"] / "sae")


def _weights(artifact) -> dict[str, torch.Tensor]:
    return {f"{stem}.{k}": v for stem in ("layer1", "layer2")
            for k, v in artifact.tensors(stem).items()}


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("over, message", [
    ({"layers": ()}, "either a layers artifact"),
    ({"layers_artifact": "x"}, "not both"),
    ({"layers": (1, 1)}, "distinct"),
    ({"buffer_tokens": 100}, "twice batch-tokens"),
    ({"arch": "relu"}, "unknown arch"),
    ({"ablation": "noise"}, "unknown ablation"),
    ({"holdout": 1.0}, "holdout"),
    ({"protect": ("ur",)}, "LANG=FILE"),
    ({"protect": ("retain=x.jsonl",)}, "reserved"),
    ({"protect": ("ur=a.jsonl", "ur=b.jsonl")}, "given twice"),
])
def test_config_refuses(data, over, message):
    with pytest.raises(ValueError, match=message):
        _config(data, **over)


def test_split_is_seeded_capped_and_disjoint(data, tmp_path):
    config = _config(data, holdout=0.5, max_heldout=2)
    first, again = split_sets(config), split_sets(config)
    assert first.heldout == again.heldout and [len(v) for v in first.heldout.values()] == [2, 2]
    held = {t for texts in first.heldout.values() for t in texts}
    assert len(first.train) == 20 and not held & set(first.train)
    assert held | set(first.train) == {*HI, *EN}
    assert split_sets(replace(config, seed=1)).heldout != first.heldout
    single = write_jsonl(tmp_path / "one.jsonl", HI[:1])
    with pytest.raises(DataError, match="at least 2"):
        split_sets(replace(config, forget=str(single)))


def test_protected_sets_are_held_out_whole_and_never_trained_on(data, tmp_path):
    ur = write_jsonl(tmp_path / "ur.jsonl", HI[:5])
    config = _config(data, protect=(f"ur={ur}",), max_heldout=3)
    split = split_sets(config)
    assert split.heldout["ur"] == HI[:3] and split.records["ur"]["n_train"] == 0
    assert len(split.train) == len(split_sets(_config(data, max_heldout=3)).train)
    assert config.feature_settings().against == ("retain", "ur")


def test_layer_out_of_range_refused(data, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        run(_config(data, layers=(9,)), tmp_path / "sae")


# --------------------------------------------------------------------------- end to end
def test_artifact_contents(trained):
    config, artifact = trained
    again = load(artifact.path, kind="sae")
    assert again.config["layers"] == [1, 2] and again.config["sae"]["k"] == 8
    assert set(again.tensor_files()) == {"layer1", "layer2", "features"}
    for layer in ("1", "2"):
        q = again.metrics["layers"][layer]
        assert 0 <= q["fvu"] < 1.5 and q["mean_l0"] == pytest.approx(8.0)
        assert 0 <= q["dead_fraction"] <= 1 and math.isfinite(q["ce_recovered"])
        assert q["ce_ablated"] > q["ce_clean"] > 0
        assert set(q["by_set"]) == {"forget", "retain"}
        assert 0 < len(again.metrics["selected"][layer]) <= 3
    assert again.metrics["training"]["steps"] == 10
    report = json.loads(again.read_text("features.json"))
    row = report["layers"]["1"]["features"][0]
    assert row["selectivity"] > 0 and math.isfinite(row["attribution"])
    assert row["contexts"] and "«" in row["contexts"][0]["context"]
    assert "## Layer 2" in again.read_text("features.md")
    assert not default_checkpoint_dir(artifact.path).exists()


def test_load_sae_reproduces_recorded_quality(trained):
    """The saved SAEs give the held-out numbers computed before saving, to float precision."""
    config, artifact = trained
    split = split_sets(config)
    saes = load_saes(artifact.path)
    with loaded(TINY) as lm:
        settings = replace(config.feature_settings(), grad_attribution=False)
        zeros = {i: torch.zeros(lm.identity.d_model) for i in saes}
        again = analyse(lm, saes, zeros, split.heldout, settings, SILENT)
    for layer in (1, 2):
        recorded = artifact.metrics["layers"][str(layer)]
        for key in ("fvu", "mean_l0", "ce_sae", "ce_recovered"):
            assert again.quality[layer][key] == pytest.approx(recorded[key], rel=1e-5)
        assert again.selected[layer] == artifact.metrics["selected"][str(layer)]


def test_load_sae_refuses_wrong_model_and_bad_shapes(trained, tmp_path):
    _, artifact = trained
    with loaded(ModelSpec(name="tiny:qwen2", device="cpu")) as other:
        with pytest.raises(ArtifactError, match="another base model"):
            load_sae(artifact.path, 1, lm_identity=other.identity)
    with loaded(TINY) as lm:
        assert load_sae(artifact.path, 1, lm_identity=lm.identity).cfg.k == 8
    with pytest.raises(ArtifactError, match="no SAE for layer 3"):
        load_sae(artifact.path, 3)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    manifest["config"]["sae"]["expansion"] = 8
    bad = save(tmp_path / "bad", "sae", tensors={"layer1": artifact.tensors("layer1")},
               config=manifest["config"], model=artifact.model)
    with pytest.raises(ArtifactError, match="do not fit"):
        load_sae(bad.path, 1)


# --------------------------------------------------------------------------- resume, cache
def test_resume_matches_uninterrupted_run_and_refuses_other_settings(trained, tmp_path):
    config, full = trained
    config = replace(config, cache_dir=None, grad_attribution=False)
    out = tmp_path / "sae"
    with pytest.raises(KeyboardInterrupt):
        run(config, out, progress=StopAfter(6, "train SAEs"))
    assert not out.exists() and (default_checkpoint_dir(out) / "state.pt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [default_checkpoint_dir(out).name]
    with pytest.raises(ArtifactError, match="other settings"):
        run(replace(config, k=4), out, resume=True)
    resumed = run(config, out, resume=True)
    assert resumed.metrics["training"]["resumed_from_step"] == 4
    expected, found = _weights(full), _weights(resumed)
    assert all(torch.equal(expected[k], found[k]) for k in expected)
    assert not default_checkpoint_dir(out).exists()


def test_cache_reused_without_model_passes(trained, data, tmp_path, monkeypatch):
    config, first = trained
    calls = []
    real = sae_stream.iter_batches
    monkeypatch.setattr(sae_stream, "iter_batches",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run(replace(config, grad_attribution=False), tmp_path / "sae")
    cache = again.metrics["cache"]
    assert calls == [] and cache["misses"] == 0 and cache["hits"] >= cache["chunks"]
    expected, found = _weights(first), _weights(again)
    assert all(torch.equal(expected[k], found[k]) for k in expected)


def test_cache_recomputes_a_damaged_shard_and_refuses_a_foreign_key(trained, tmp_path):
    config, _ = trained
    folder = next(Path(config.cache_dir).glob("acts-*"))
    shard = folder / "chunk000000.safetensors"
    tensors = load_file(str(shard))
    save_file({k: v[:-1].contiguous() for k, v in tensors.items()}, str(shard))  # one token short
    again = run(replace(config, grad_attribution=False), tmp_path / "sae")
    assert again.metrics["cache"]["misses"] == 1
    assert load_file(str(shard))["L1"].shape == tensors["L1"].shape
    key = json.loads((folder / "key.json").read_text())
    (folder / "key.json").write_text(json.dumps({**key, "max_length": 1}))
    try:
        with pytest.raises(ArtifactError, match="another setup"):
            run(replace(config, grad_attribution=False), tmp_path / "sae2")
    finally:
        (folder / "key.json").write_text(json.dumps(key))


# --------------------------------------------------------------------------- quality maths
def test_ce_recovered_formula():
    assert ce_recovered(2.0, 2.0, 4.0) == (1.0, None)
    assert ce_recovered(2.0, 3.0, 4.0)[0] == pytest.approx(0.5)
    value, reason = ce_recovered(2.0, 2.5, 2.0)
    assert value is None and "does not raise the loss" in reason
    assert selectivity(torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.5])).tolist() == \
        pytest.approx([1.0, -1.0], abs=1e-5)


def test_monolingual_selection_ranks_out_a_latent_shared_with_a_protected_language():
    """Latent 0 fires on Hindi and Urdu alike (an Indic-script latent), latent 1 on Hindi only."""
    stats = {"freq_forget": torch.tensor([0.9, 0.5]), "freq_retain": torch.tensor([0.0, 0.1]),
             "freq_ur": torch.tensor([0.8, 0.0]), "mean_forget": torch.tensor([2.0, 2.0])}
    _, pooled = latent_scores(stats, ("retain",))
    sel, mono = latent_scores(stats, ("retain", "ur"))
    assert pooled.tolist() == pytest.approx([2.0, 4 / 3], abs=1e-4)
    assert sel.tolist() == pytest.approx([0.1 / 1.7, 0.4 / 0.6], abs=1e-4)
    assert int(pooled.argmax()) == 0 and int(mono.argmax()) == 1


def test_analyse_reports_each_protected_language(data):
    settings = FeatureSettings(max_length=32, batch_size=4, top_n=4, against=("retain", "ur"))
    heldout = {"forget": HI[:3], "retain": EN[:3], "ur": HI[3:6]}
    with loaded(TINY) as lm:
        d = lm.identity.d_model
        result = analyse(lm, {1: _identity_sae(d)}, {1: torch.zeros(d)}, heldout, settings,
                         SILENT)
    report = json.loads(result.files["features.json"])
    assert report["against"] == ["retain", "ur"] and report["layers"]["1"]["features"]
    for row in report["layers"]["1"]["features"]:
        assert row["freq_against"] == max(row["freq_retain"], row["freq_protected"]["ur"])
        assert row["freq_forget"] > row["freq_against"]
    assert "L1.freq_ur" in result.tensors["features"]


def _identity_sae(d: int):
    """x = relu(x) - relu(-x): 2d latents, all kept, reconstruct exactly."""
    sae = build_sae(SaeConfig(d_model=d, expansion=2, k=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_sae_recovers_everything_and_null_sae_nothing(data):
    settings = FeatureSettings(max_length=32, batch_size=4, top_n=2)
    heldout = {"forget": HI[:3], "retain": EN[:3]}
    with loaded(TINY) as lm:
        d = lm.identity.d_model
        exact = _identity_sae(d)
        null = _identity_sae(d)
        with torch.no_grad():
            null.W_dec.zero_()
        zeros = {1: torch.zeros(d)}
        good = analyse(lm, {1: exact}, zeros, heldout, settings, SILENT).quality[1]
        bad = analyse(lm, {1: null}, zeros, heldout, settings, SILENT).quality[1]
        held = heldout_pass(lm, {1: exact}, zeros, HI[:3], settings, SILENT, "x")
        mean = {1: held.acts[1].mean(0)}
        by_mean = analyse(lm, {1: exact}, mean, heldout, replace(settings, ablation="mean"),
                          SILENT).quality[1]
    assert good["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert good["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert bad["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert metrics(exact, held.acts[1])["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert by_mean["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert by_mean["ce_ablated"] != pytest.approx(good["ce_ablated"])


# --------------------------------------------------------------------------- SAELens export
def test_saelens_topk_export_matches_sae(trained, tmp_path):
    _, artifact = trained
    folders = export_saelens(artifact, tmp_path / "sl")
    assert [f.name for f in folders] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    cfg = json.loads((folders[0] / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["activation_fn_kwargs"] == {"k": 8}
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_layer"]) == (32, 128, 1)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["model_name"] == "tiny:llama" and cfg["hf_hook_name"] == "model.layers.1"
    w = load_file(str(folders[0] / "sae_weights.safetensors"))
    assert {k: list(v.shape) for k, v in w.items()} == {
        "W_enc": [32, 128], "b_enc": [128], "W_dec": [128, 32], "b_dec": [32]}
    assert load_file(str(folders[0] / "sparsity.safetensors"))["sparsity"].shape == (128,)
    x = torch.randn(5, 32)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # SAELens TopK inference
    top = pre.topk(8, dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ w["W_dec"]
    sae = load_sae(artifact.path, 1)
    assert torch.allclose(recon + w["b_dec"], sae.decode_sparse(*sae.encode(x)), atol=1e-5)
    with pytest.raises(ArtifactError, match="already exists"):
        export_saelens(artifact, tmp_path / "sl")


def test_saelens_batchtopk_exports_as_jumprelu(tmp_path):
    cfg = SaeConfig(d_model=16, expansion=2, k=4, arch="batchtopk")
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.fill_(0.05)
        sae.b_enc.normal_(0, 0.1)
    art = save(tmp_path / "sae", "sae", tensors={"layer0": sae.state_dict()}, model=None,
               config={"layers": [0], "sae": asdict(cfg), "max_length": 16})
    (folder,) = export_saelens(art, tmp_path / "sl")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert w["threshold"].shape == (32,)
    x = torch.randn(6, 16)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # SAELens JumpReLU inference
    recon = (pre.relu() * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    loaded_sae = load_sae(art.path, 0)
    assert torch.allclose(recon, loaded_sae.decode_sparse(*loaded_sae.encode(x)), atol=1e-5)


# --------------------------------------------------------------------------- CLI
def test_cli_with_layers_artifact(data, tmp_path):
    with loaded(TINY) as lm:
        layers = save(tmp_path / "layers", "layers", tensors={}, config={},
                      model=lm.identity, metrics={"chosen": [2, 1]})
    args = ["train-sae", "--model", "tiny:llama", "--layers", str(layers.path),
            "--forget", str(data["hi"]), "--retain", str(data["en"]),
            "--out", str(tmp_path / "sae"), "--expansion", "2", "--k", "4", "--tokens", "256",
            "--batch-tokens", "64", "--buffer-tokens", "128", "--holdout", "0.25",
            "--top-n-features", "2", "--export-saelens", str(tmp_path / "sl"), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(summary["layers"]) == {"1", "2"} and len(summary["saelens"]) == 2
    artifact = load(tmp_path / "sae", kind="sae")
    assert artifact.manifest["parents"][0]["kind"] == "layers"
    assert "recovered" in result.output and "layer 1 latent" in result.output


@pytest.mark.parametrize("extra", [[], ["--layer", "1", "--layers", "x"]])
def test_cli_layers_usage_error(data, tmp_path, extra):
    args = ["train-sae", "--model", "tiny:llama", "--forget", str(data["hi"]),
            "--retain", str(data["en"]), "--out", str(tmp_path / "sae"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--layer" in result.output


def test_layers_artifact_of_other_model_refused(data, tmp_path):
    with loaded(ModelSpec(name="tiny:qwen2", device="cpu")) as other:
        layers = save(tmp_path / "layers", "layers", tensors={}, config={},
                      model=other.identity, metrics={"chosen": [1]})
    config = _config(data, layers=(), layers_artifact=str(layers.path))
    with pytest.raises(ArtifactError, match="another base model"):
        run(config, tmp_path / "sae")
