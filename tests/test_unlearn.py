"""`unlearn`: LoRA / ReFT training on tiny models, artifacts, loading checks, resume, NaN, seeds."""

from __future__ import annotations

import gc
import json
import math
import weakref
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mmie.core.models
import mmie.unlearn.stage as unlearn
from mmie.core.artifacts import load, save
from mmie.core.errors import ArtifactError, DataError, MmieError
from mmie.core.models import ModelSpec, get_decoder, loaded
from mmie.edits.adapters import PEFT_WEIGHTS, load_adapter
from mmie.unlearn.data import References, build_schedule, curriculum_order
from mmie.unlearn.objectives import GradientAscent
from mmie.unlearn.stage import UnlearnConfig, checkpoint_dir, run, run_seeds
from mmie.unlearn.train import TrainingDiverged
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import (
    StopAfter,
    one_thread,  # noqa: F401  (autouse: one torch thread)
)

UR = ["میں آج بازار جا رہا ہوں", "یہ کتاب بہت اچھی ہے", "بارش کے بعد موسم ٹھنڈا ہو گیا",
      "ہمارے گاؤں میں ایک پرانا مندر ہے", "بچے میدان میں کرکٹ کھیل رہے ہیں",
      "ماں نے آج مزیدار کھانا بنایا"]
LLAMA = ModelSpec(name="tiny:llama", device="cpu")
# PEFT calls a transformers method deprecated in v5; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")




@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"hi": write_jsonl(root / "hi.jsonl", HI), "en": write_jsonl(root / "en.jsonl", EN),
            "ur": write_jsonl(root / "ur.jsonl", UR)}


def config(files, **kw) -> UnlearnConfig:
    base = dict(forget=str(files["hi"]), retain=(str(files["en"]),), model=LLAMA, steps=4,
                lr=1e-2, batch_size=2, max_length=24, checkpoint_every=2)
    return UnlearnConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> dict[str, Path]:
    """One LoRA+NPO and one gated ReFT+GradDiff run, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    lora = run(config(files, method="lora", objective="npo", rank=4,
                      retain=(str(files["en"]), str(files["ur"]))), root / "lora")
    reft = run(config(files, method="reft", objective="graddiff", gate="grun", lr=2e-2),
               root / "reft")
    return {"lora": lora.path, "reft": reft.path}


def base_hidden(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return get_decoder(lm.model)(input_ids=ids).last_hidden_state


IDS = torch.tensor([[1, 80, 81, 82, 83, 84, 85]])


@pytest.mark.parametrize("method", ["lora", "reft"])
def test_run_lowers_forget_loss_and_writes_loadable_adapter(trained, method):
    artifact = load(trained[method], kind="adapter")
    curve = artifact.metrics["curve"]
    assert len(curve) == 4 and curve[-1]["forget"] < curve[0]["forget"]
    assert curve[-1]["forget_nll"] > curve[0]["forget_nll"]  # forget text got less likely
    # the edit starts as the identity and the reference is precomputed on the same tokens:
    # NPO's first loss is -(2/beta) log sigmoid(0) and the first retain KL is 0
    if method == "lora":
        assert curve[0]["forget"] == pytest.approx(20 * math.log(2), rel=1e-5)
    assert curve[0]["retain"] == pytest.approx(0.0, abs=1e-5)
    assert artifact.config["method"] == method and artifact.config["layers_used"]
    with loaded(LLAMA) as lm:
        before = base_hidden(lm, IDS)
        rng = torch.get_rng_state()
        adapter = load_adapter(artifact.path, lm)
        assert torch.equal(torch.get_rng_state(), rng)  # loading leaves sampling seeds alone
        with adapter.edits():
            edited = base_hidden(lm, IDS)
        adapter.remove()
        assert not torch.allclose(edited, before)
        assert torch.equal(base_hidden(lm, IDS), before)
        assert not any("lora" in name for name, _ in lm.model.named_modules())


def test_manifest_records_weights_layers_and_curve(trained):
    artifact = load(trained["lora"], kind="adapter")
    cfg = artifact.config
    assert cfg["retain_set_weights"] == {"en": 0.5, "ur": 0.5}
    assert cfg["layers_used"] == [0, 1, 2, 3] and cfg["adapter"]["rank"] == 4
    assert cfg["objective"] == "npo" and cfg["objective_config"]["beta"] == 0.1
    assert cfg["retain_loss"] == "kl" and cfg["retain_loss_config"]["top_k"] == 64
    assert {"adapter_config.json", PEFT_WEIGHTS} <= set(artifact.manifest["files"])
    assert artifact.metrics["seconds_per_step"] > 0
    assert not checkpoint_dir(artifact.path).exists()  # removed once the artifact is saved


def test_wrong_base_model_refused(files, tmp_path):
    qwen = run(config(files, method="reft", objective="ga", steps=1,
                      model=ModelSpec(name="tiny:qwen2", device="cpu")), tmp_path / "q")
    with loaded(LLAMA) as lm, pytest.raises(ArtifactError, match="another base model"):
        load_adapter(qwen.path, lm)


def _resave(src: Path, out: Path, tensors=None, writer=None, config=None) -> Path:
    art = load(src, kind="adapter")
    save(out, "adapter", tensors=tensors or {}, writer=writer, config=config or art.config,
         model=art.model, metrics=art.metrics)
    return out


def test_tampered_reft_shape_and_missing_key_named(trained, tmp_path):
    state = load(trained["reft"]).tensors("reft")
    key = next(k for k in state if k.endswith("edit.up.weight"))
    bad = {**state, key: torch.zeros(3, 3)}
    short = {k: v for k, v in state.items() if not k.endswith("gate.out.bias")}
    with loaded(LLAMA) as lm:
        shape = rf"{key}: expected shape \[32, 4\], found \[3, 3\]"
        with pytest.raises(ArtifactError, match=shape):
            load_adapter(_resave(trained["reft"], tmp_path / "a", {"reft": bad}), lm)
        with pytest.raises(ArtifactError, match=r"missing keys: layer\d\.gate\.out\.bias"):
            load_adapter(_resave(trained["reft"], tmp_path / "b", {"reft": short}), lm)
        cfg = load(trained["reft"]).config
        other_rank = {**cfg, "adapter": {**cfg["adapter"], "rank": 2}}
        with pytest.raises(ArtifactError, match="expected shape"):
            load_adapter(_resave(trained["reft"], tmp_path / "c", {"reft": state},
                                 config=other_rank), lm)


def test_tampered_lora_file_named(trained, tmp_path):
    src = load(trained["lora"])
    state = load_file(str(src.path / PEFT_WEIGHTS))
    victim = sorted(state)[0]
    state[victim] = torch.zeros(1, 1)

    def writer(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(src.read_text("adapter_config.json"))
        save_file(state, str(tmp / PEFT_WEIGHTS))

    with loaded(LLAMA) as lm, pytest.raises(ArtifactError, match=rf"{victim}: expected shape"):
        load_adapter(_resave(src.path, tmp_path / "l", writer=writer), lm)


def test_resume_reaches_the_uninterrupted_weights(files, tmp_path):
    cfg = config(files, method="lora", objective="npo", rank=2, layers=None)
    whole = run(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", progress=StopAfter(2))
    assert json.loads((checkpoint_dir(tmp_path / "cut") / "state.json").read_text())["step"] == 2
    resumed = run(cfg, tmp_path / "cut", resume=True)
    assert resumed.metrics["resumed_from_step"] == 2
    a, b = (load_file(str(p / PEFT_WEIGHTS)) for p in (whole.path, resumed.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in whole.metrics["curve"]] == \
        [r["loss"] for r in resumed.metrics["curve"]]
    # a complete artifact is skipped by --resume, not retrained
    again = run(cfg, tmp_path / "cut", resume=True)
    assert again.manifest["created_at"] == resumed.manifest["created_at"]
    assert again.manifest["files"] == resumed.manifest["files"]


def test_resume_refuses_other_settings(files, tmp_path):
    cfg = config(files, method="reft", objective="ga")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "r", progress=StopAfter(2))
    with pytest.raises(MmieError, match="other settings.*seed"):
        run(replace(cfg, seed=5), tmp_path / "r", resume=True)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(files, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = GradientAscent.forget_loss

    def flaky(self, inputs):
        calls["n"] += 1
        value = original(self, inputs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(GradientAscent, "forget_loss", flaky)
    with pytest.raises(TrainingDiverged, match=r"step 3: loss is not finite.*kept in"):
        run(config(files, method="reft", objective="ga"), tmp_path / "nan")
    ckpt = checkpoint_dir(tmp_path / "nan")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "nan").exists()


def test_seeds_run_in_sequence_and_release_models(files, tmp_path, monkeypatch):
    refs, rss = [], []
    original_load, original_runner = mmie.core.models.load_model, unlearn.RUNNERS["reft"]

    def tracking_load(spec):
        handle = original_load(spec)
        refs.append(weakref.ref(handle.model))
        return handle

    def measured(*args, **kwargs):
        result = original_runner(*args, **kwargs)
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
        return result

    monkeypatch.setattr(mmie.core.models, "load_model", tracking_load)
    monkeypatch.setitem(unlearn.RUNNERS, "reft", measured)
    arts = run_seeds(config(files, method="reft", objective="ga", steps=1), [1, 2, 3],
                     tmp_path / "seeds")
    assert [a.path.name for a in arts] == ["seed1", "seed2", "seed3"]
    assert [a.config["seed"] for a in arts] == [1, 2, 3]
    first, third = (a.tensors("reft") for a in (arts[0], arts[2]))
    assert any(not torch.equal(first[k], third[k]) for k in first)  # seeds differ
    gc.collect()
    assert len(refs) == 3 and all(r() is None for r in refs)  # every model was released
    assert rss[2] <= rss[0] * 1.05


def test_empty_retain_is_a_data_error_before_any_model_loads(files, tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")

    def no_load(spec):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(mmie.core.models, "load_model", no_load)
    with pytest.raises(DataError, match="no non-empty texts"):
        run(config(files, retain=(str(files["en"]), str(empty))), tmp_path / "o")
    with pytest.raises(DataError):
        run_seeds(config(files, forget=str(empty)), [1, 2], tmp_path / "o2")


def test_retain_weights_named_by_stem_or_path_and_normalised(files):
    cfg = config(files, retain=(str(files["en"]), str(files["ur"])),
                 retain_weights=(("en", 3.0),))
    assert cfg.set_weights() == [0.75, 0.25]
    with pytest.raises(ValueError, match="no retain set"):
        config(files, retain_weights=(("bn", 1.0),))
    with pytest.raises(ValueError, match="must be > 0"):
        config(files, retain_weights=(("en", 0.0),))
    with pytest.raises(ValueError, match="unknown option"):
        config(files, objective_options=(("gamma_typo", "1"),))
    assert config(files, objective="npo", objective_options=(("beta", "0.5"),)) \
        .build_objective(0).config.beta == 0.5


def test_schedule_is_seeded_weighted_and_follows_curriculum():
    a = build_schedule(5, [10, 10], [0.9, 0.1], steps=50, batch_size=4, seed=3)
    b = build_schedule(5, [10, 10], [0.9, 0.1], steps=50, batch_size=4, seed=3)
    assert a == b
    flat = sum(a.retain, [])
    assert 0.8 < sum(i < 10 for i in flat) / len(flat) < 0.97
    assert sorted(sum(a.forget, [])[:5]) == list(range(5))  # whole epochs
    refs = References(forget_logp={0: -9.0, 1: -2.0, 2: -5.0})
    order = curriculum_order(refs, 3)
    assert order == [1, 2, 0]
    c = build_schedule(3, [4], [1.0], steps=3, batch_size=2, seed=0, forget_order=order)
    assert sum(c.forget, []) == [1, 2, 0, 1, 2, 0]


def test_rmu_and_curriculum_run(files, tmp_path):
    art = run(config(files, method="lora", objective="rmu", curriculum=True, rank=2,
                     objective_options=(("steering_coeff", "20"), ("alpha", "10"))),
              tmp_path / "rmu")
    curve = art.metrics["curve"]
    assert art.config["objective_config"]["layer"] == 2  # middle block of 4, every block edited
    assert curve[-1]["forget"] < curve[0]["forget"]


def test_cli_unlearn_smoke(files, tmp_path):
    from mmie.cli import app

    out = tmp_path / "cli"
    args = ["unlearn", "--model", "tiny:llama", "--device", "cpu", "--forget", str(files["hi"]),
            "--retain", str(files["en"]), "--retain", str(files["ur"]), "--retain-weight",
            "en=2", "--out", str(out), "--method", "reft", "--objective", "simnpo",
            "--steps", "2", "--batch-size", "2", "--max-length", "16", "--seed", "1",
            "--seed", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [Path(s["path"]).name for s in summary] == ["seed1", "seed2"]
    assert load(out / "seed2", kind="adapter").config["retain_set_weights"]["en"] == \
        pytest.approx(2 / 3)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already exists" in " ".join(again.output.split())
    bad = CliRunner().invoke(app, [*args[:-1], "--steps", "0", "--force"])
    assert bad.exit_code == 2


def test_layers_artifact_limits_lora_and_reft_and_is_a_parent(files, tmp_path):
    with loaded(LLAMA) as lm:
        layers = save(tmp_path / "layers", "layers", tensors={}, config={}, model=lm.identity,
                      metrics={"chosen": [2, 1]}).path
    lora = run(config(files, method="lora", objective="ga", steps=1, layers=str(layers)),
               tmp_path / "lora")
    peft = json.loads(lora.read_text("adapter_config.json"))
    assert peft["layers_to_transform"] == [1, 2] and lora.config["layers_used"] == [1, 2]
    assert [p["kind"] for p in lora.manifest["parents"]] == ["layers"]
    reft = run(config(files, method="reft", objective="ga", steps=1, layers=str(layers)),
               tmp_path / "reft")
    assert sorted({k.split(".")[0] for k in reft.tensors("reft")}) == ["layer1", "layer2"]


def test_gated_reft_trains_its_gate(trained):
    curve = load(trained["reft"]).metrics["curve"]
    assert all("gate" in r for r in curve) and curve[-1]["gate"] < curve[0]["gate"]


def test_cli_scrub_method_writes_a_scrub_artifact(files, tmp_path):
    from mmie.cli import app

    result = CliRunner().invoke(app, [
        "unlearn", "--model", "tiny:llama", "--device", "cpu", "--forget", str(files["hi"]),
        "--retain", str(files["en"]), "--out", str(tmp_path / "s"), "--method", "scrub",
        "--scrub-whiten", "--max-length", "16", "--json"])
    assert result.exit_code == 0, result.output
    art = load(tmp_path / "s", kind="scrub")
    assert art.config["whiten"] is True and art.config["layers"] == [0, 1, 2]
