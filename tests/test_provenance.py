"""Provenance (issue 15): what a comparison or a resume combines is checked before it is used.

Each test names the failure of the issue it covers (F1..F8); tiny models, CPU, hand-set data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mmie.gate.stage
import mmie.unlearn.stage
from mmie.cli import app
from mmie.core import artifacts
from mmie.core.artifacts import load, safetensors_header, save
from mmie.core.data import read_texts
from mmie.core.errors import ArtifactError, DataError, MmieError
from mmie.core.models import ModelSpec, loaded
from mmie.core.progress import Progress, Task
from mmie.edits.adapters import PEFT_WEIGHTS
from mmie.evaluate.stage import EvalConfig
from mmie.evaluate.stage import run as evaluate
from mmie.gate.stage import GateConfig
from mmie.gate.stage import run as gate
from mmie.unlearn.stage import UnlearnConfig, checkpoint_dir
from mmie.unlearn.stage import run as unlearn
from tests.conftest import EN, HI, write_jsonl
from tests.gate_synth import BASE as BASELINE
from tests.helpers import (
    StopAfter,
    one_thread,  # noqa: F401  (autouse: one torch thread)
)
from tests.test_gate import WORKING
from tests.test_gate import _write as make_eval

runner = CliRunner()
LLAMA = ModelSpec(name="tiny:llama", device="cpu")
QWEN = ModelSpec(name="tiny:qwen2", device="cpu")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")




@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return {"hi": write_jsonl(tmp_path / "hi.jsonl", HI),
            "en": write_jsonl(tmp_path / "en.jsonl", EN)}


def _unlearn_config(files, **kw) -> UnlearnConfig:
    base = dict(forget=str(files["hi"]), retain=(str(files["en"]),), model=LLAMA, steps=4,
                lr=1e-2, batch_size=2, max_length=24, checkpoint_every=2, rank=2)
    return UnlearnConfig(**{**base, **kw})


def _said(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _no_model(monkeypatch):
    """Any model load fails the test: the refusal must come before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(mmie.unlearn.stage, "loaded", refuse)


def _gate_config() -> GateConfig:
    return GateConfig.from_toml(None, n_boot=200)


def _eval_with(root: Path, name: str, **config) -> Path:
    """A synthetic eval artifact (tests/test_gate.py's maker) re-saved with extra config."""
    src = load(make_eval(root / "src", name, config.pop("arm", "base"), 0, BASELINE))
    files = {rel: src.read_text(rel) for rel in src.manifest["files"]}
    return save(root / name, "eval", tensors={}, config={**src.config, **config},
                model=None, files=files, metrics=src.metrics).path


# --- F1: gate / evaluate --baseline combine different base models ------------------------------

@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> dict[str, Path]:
    """Real evals: tiny:llama (the baseline) and tiny:qwen2 on the same texts."""
    root = tmp_path_factory.mktemp("evals")
    hi, en = write_jsonl(root / "hi.jsonl", HI[:6]), write_jsonl(root / "en.jsonl", EN[:6])
    base = dict(forget=str(hi), retain=str(en), n_prompts=4, max_new_tokens=4, batch_size=4)
    evaluate(EvalConfig(model=LLAMA, **base), root / "llama")
    evaluate(EvalConfig(model=QWEN, **base), root / "qwen")
    return {"llama": root / "llama", "qwen": root / "qwen", "base": base}


def test_f1_gate_refuses_evals_of_another_base_model(two_models, tmp_path):
    with pytest.raises(ArtifactError, match=r"base model 'tiny:llama' .*'tiny:qwen2'"):
        gate(_gate_config(), two_models["llama"], [two_models["qwen"]], tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_f1_evaluate_refuses_a_baseline_of_another_base_model(two_models, tmp_path):
    config = EvalConfig(model=QWEN, baseline=str(two_models["llama"]), **two_models["base"])
    with pytest.raises(ArtifactError, match=r"base model 'tiny:llama' .*'tiny:qwen2'"):
        evaluate(config, tmp_path / "e")


def test_f1_gate_refuses_an_adapter_eval_as_baseline(tmp_path):
    baseline = _eval_with(tmp_path, "edited", arm="lora-npo", adapter="runs/adapter")
    arm = make_eval(tmp_path, "arm", "lora-npo", 1, WORKING)
    with pytest.raises(ArtifactError, match="eval of an edited model.*adapter runs/adapter"):
        gate(_gate_config(), baseline, [arm], tmp_path / "g")


def test_f1_gate_refuses_the_baseline_given_again_as_an_arm(tmp_path):
    baseline = make_eval(tmp_path, "base", "base", 0, BASELINE)
    with pytest.raises(ArtifactError, match="is the baseline"):
        gate(_gate_config(), baseline, [baseline], tmp_path / "g")


# --- F2 / F3: --resume accepts changed settings, data, or a finished artifact ------------------

def _cut(cfg: UnlearnConfig, out: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        unlearn(cfg, out, progress=StopAfter(2))
    assert checkpoint_dir(out).is_dir()


@pytest.mark.parametrize(("change", "field"), [({"lr": 2e-2}, "lr"),
                                               ({"max_grad_norm": 0.5}, "max_grad_norm")])
def test_f2_resume_refuses_a_changed_setting(files, tmp_path, change, field):
    cfg = _unlearn_config(files)
    _cut(cfg, tmp_path / "a")
    with pytest.raises(MmieError, match=rf"other settings.*{field}: "):
        unlearn(replace(cfg, **change), tmp_path / "a", resume=True)


def test_f2_resume_refuses_data_whose_content_changed_at_the_same_path(files, tmp_path):
    cfg = _unlearn_config(files)
    _cut(cfg, tmp_path / "a")
    write_jsonl(files["en"], list(reversed(EN)))  # same path, other content
    with pytest.raises(MmieError, match=r"other settings or inputs.*data_sha256"):
        unlearn(cfg, tmp_path / "a", resume=True)


def test_f2_a_changed_checkpoint_interval_still_resumes_bit_identically(files, tmp_path):
    cfg = _unlearn_config(files)
    whole = unlearn(cfg, tmp_path / "whole")
    _cut(cfg, tmp_path / "a")
    resumed = unlearn(replace(cfg, checkpoint_every=3), tmp_path / "a", resume=True)
    assert resumed.metrics["resumed_from_step"] == 2
    assert [r["loss"] for r in resumed.metrics["curve"]] == \
        [r["loss"] for r in whole.metrics["curve"]]


class Logged(Progress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def task(self, desc, total=None):
        lines = self.lines

        class Keep(Task):
            def log(self, message: str) -> None:
                lines.append(message)

        from contextlib import nullcontext
        return nullcontext(Keep())


def test_f3_resume_on_a_finished_artifact_refuses_new_options(files, tmp_path):
    cfg = _unlearn_config(files, steps=2)
    done = unlearn(cfg, tmp_path / "a")
    for change in ({"steps": 3}, {"objective": "ga"}, {"model": QWEN}):
        with pytest.raises(ArtifactError, match=f"already complete but .*{next(iter(change))}"):
            unlearn(replace(cfg, **change), tmp_path / "a", resume=True)
    logged = Logged()
    again = unlearn(cfg, tmp_path / "a", resume=True, progress=logged)
    assert again.manifest["created_at"] == done.manifest["created_at"]
    assert any("already complete, nothing to do" in line for line in logged.lines)


# --- F4: --out equal to, containing or inside an input ------------------------------------------

def test_f4_gate_out_on_its_baseline_is_refused_even_with_force(tmp_path):
    baseline = make_eval(tmp_path, "base", "base", 0, BASELINE)
    arm = make_eval(tmp_path, "arm", "lora-npo", 1, WORKING)
    for out, how in ((baseline, "is"), (baseline / "sub", "is inside"), (tmp_path, "contains")):
        with pytest.raises(ArtifactError, match=f"--out .* {how} the input"):
            gate(_gate_config(), baseline, [arm], out, force=True)
    assert load(baseline, kind="eval").config["arm"] == "base"


def test_f4_unlearn_out_on_its_layers_artifact_is_refused(files, tmp_path, monkeypatch):
    with loaded(LLAMA) as lm:
        identity = lm.identity
    layers = save(tmp_path / "layers", "layers", tensors={}, config={}, model=identity,
                  metrics={"chosen": [1]}).path
    _no_model(monkeypatch)
    with pytest.raises(ArtifactError, match="is the input"):
        unlearn(_unlearn_config(files, layers=str(layers)), layers, force=True)
    assert load(layers, kind="layers").metrics == {"chosen": [1]}


def test_f4_cli_out_on_an_input_is_refused(files, tmp_path):
    result = runner.invoke(app, ["select-layers", "--forget", str(files["hi"]), "--retain",
                                 str(files["en"]), "--model", "tiny:llama", "--out",
                                 str(tmp_path), "--force"])
    assert result.exit_code == 1 and "contains the input" in _said(result)


# --- F5: output problems found after the work ---------------------------------------------------

def test_f5_a_file_at_out_is_refused_before_training(files, tmp_path, monkeypatch):
    (tmp_path / "out").write_text("not a folder")
    _no_model(monkeypatch)
    with pytest.raises(ArtifactError, match="is a file"):
        unlearn(_unlearn_config(files), tmp_path / "out", force=True)


def test_f5_a_foreign_folder_at_out_is_refused_before_training(files, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    _no_model(monkeypatch)
    with pytest.raises(ArtifactError, match="not an mmie artifact"):
        unlearn(_unlearn_config(files), tmp_path / "out", force=True)


def test_f5_empty_out_is_refused(files, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["unlearn", "--forget", str(files["hi"]), "--retain",
                                 str(files["en"]), "--model", "tiny:llama", "--out", "",
                                 "--force"])
    assert result.exit_code == 1 and "current folder" in _said(result)


def test_f5_gate_refuses_an_existing_out_before_computing(tmp_path, monkeypatch):
    baseline = make_eval(tmp_path, "base", "base", 0, BASELINE)
    arm = make_eval(tmp_path, "arm", "lora-npo", 1, WORKING)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.txt").write_text("x")

    def boom(*args, **kwargs):
        raise AssertionError("computed before the refusal")
    monkeypatch.setattr(mmie.gate.stage, "evaluate_gates", boom)
    with pytest.raises(ArtifactError, match="not an mmie artifact"):
        gate(_gate_config(), baseline, [arm], tmp_path / "g", force=True)
    existing = make_eval(tmp_path, "done", "base", 0, BASELINE)
    with pytest.raises(ArtifactError, match="already exists"):
        gate(_gate_config(), baseline, [arm], existing)


# --- F6: manifest fields covered by a hash; LoRA tensors listed ---------------------------------

def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_f6_an_edited_manifest_is_refused(tmp_path):
    art = save(tmp_path / "a", "adapter", tensors={}, config={"objective": "npo"}, model=None)
    _edit_manifest(art.path, lambda m: m["config"].update(objective="ga"))
    with pytest.raises(ArtifactError, match="manifest was edited"):
        load(art.path)


def test_f6_a_manifest_without_hash_still_loads(tmp_path):
    """Artifacts written before the hash existed load as they are."""
    art = save(tmp_path / "a", "eval", tensors={}, config={"arm": "base"}, model=None)
    _edit_manifest(art.path, lambda m: m.pop(artifacts.HASH_KEY))
    assert load(art.path).config == {"arm": "base"}


def test_f6_lora_manifest_lists_its_tensors(files, tmp_path):
    art = unlearn(_unlearn_config(files, steps=1), tmp_path / "lora")
    listed = art.manifest["tensors"]["adapter_model"]
    header = safetensors_header(art.path / PEFT_WEIGHTS)
    assert listed and set(listed) == set(header)
    assert all(meta["dtype"] == "float32" and meta["shape"] == header[name]["shape"]
               for name, meta in listed.items())
    _edit_manifest(art.path, lambda m: m["config"].update(objective="ga"))
    with pytest.raises(ArtifactError, match="manifest was edited"):
        load(art.path, kind="adapter")


# --- F7: temp folders left by kill -9 ----------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_f7_stale_temp_folders_are_removed_by_the_next_run(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".a.tmp-{dead}-x1y2", tmp_path / f".a.checkpoint.tmp-{dead}",
             tmp_path / f".a.old-{dead}", tmp_path / ".a.tmp-legacy99"]
    live = [tmp_path / f".a.tmp-{os.getpid()}-zz", tmp_path / ".b.tmp-legacy11"]
    for folder in stale + live:
        folder.mkdir()
    day_ago = time.time() - 2 * artifacts.LEGACY_TEMP_AGE
    os.utime(tmp_path / ".a.tmp-legacy99", (day_ago, day_ago))
    save(tmp_path / "a", "eval", tensors={}, config={}, model=None)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in live)


def test_f7_unlearn_cleans_a_killed_runs_checkpoint_temp(files, tmp_path, monkeypatch):
    leftover = tmp_path / f".a.checkpoint.tmp-{_dead_pid()}"
    leftover.mkdir()
    _no_model(monkeypatch)
    with pytest.raises(AssertionError):  # cleaned before the (refused) model load
        unlearn(_unlearn_config(files), tmp_path / "a")
    assert not leftover.exists()


# --- F8: messages -------------------------------------------------------------------------------

def test_f8_corrupt_safetensors_header_names_the_file(tmp_path):
    art = save(tmp_path / "a", "sae", tensors={"w": {"x": torch.ones(2)}}, config={},
               model=None)
    path = art.path / "w.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(ArtifactError, match=r"w\.safetensors: not a readable safetensors"):
        load(art.path, verify_hashes=False)


def test_f8_truncated_safetensors_is_a_user_error_exit_1(tmp_path):
    art = save(tmp_path / "a", "sae", tensors={"w": {"x": torch.ones(2)}}, config={},
               model=None)
    path = art.path / "w.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(MmieError, match="not a readable safetensors"):
        safetensors_header(path)


def test_f8_gate_config_missing_is_one_clear_line(tmp_path):
    baseline = make_eval(tmp_path, "base", "base", 0, BASELINE)
    result = runner.invoke(app, ["gate", "--baseline", str(baseline), "--eval", str(baseline),
                                 "--config", str(tmp_path / "missing.toml"), "--out",
                                 str(tmp_path / "g")])
    assert result.exit_code == 1
    assert "missing.toml: no such file" in _said(result) and "Errno" not in result.output


def test_f8_rank_zero_blames_rank(files):
    with pytest.raises(ValueError, match="rank must be >= 1, got 0") as err:
        _unlearn_config(files, rank=0)
    assert "gate-weight" not in str(err.value)


def test_f8_a_folder_named_jsonl_is_not_reported_missing(tmp_path):
    (tmp_path / "texts.jsonl").mkdir()
    with pytest.raises(DataError, match="is a folder, not a .jsonl file"):
        read_texts(tmp_path / "texts.jsonl")


def test_f8_a_utf8_bom_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "नमस्ते"}\n{"text": "hi"}\n'.encode())
    assert read_texts(path) == ["नमस्ते", "hi"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    assert read_texts(tmp_path / "bom.txt") == ["one", "two"]


def test_f8_data_check_refuses_an_empty_file_and_counts_blank_lines(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "empty.jsonl"), "--no-lid"])
    assert result.exit_code == 1 and "no non-empty texts" in _said(result)
    blanks = tmp_path / "blanks.jsonl"
    blanks.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    result = runner.invoke(app, ["data", "check", str(blanks), "--no-lid", "--json"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)["files"]
    assert (report["lines"], report["texts"], report["empty"]) == (4, 2, 2)


def test_f8_data_check_of_a_file_with_itself_reports_full_overlap(files):
    result = runner.invoke(app, ["data", "check", str(files["hi"]), str(files["hi"]),
                                 "--no-lid", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["overlap"][0]["shared"] == len(HI)


def test_f8_forget_equal_to_retain_is_refused(files, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    copy = write_jsonl(tmp_path / "copy-of-hi.jsonl", HI)
    for retain in (files["hi"], copy):
        with pytest.raises(DataError, match="also given as retain set"):
            unlearn(_unlearn_config(files, retain=(str(files["en"]), str(retain))),
                    tmp_path / "a")
    result = runner.invoke(app, ["select-layers", "--forget", str(files["hi"]), "--retain",
                                 str(copy), "--model", "tiny:llama", "--out",
                                 str(tmp_path / "s")])
    assert result.exit_code == 1 and "also given as retain set" in _said(result)


def test_f8_a_nan_in_the_baseline_is_blamed_on_the_baseline(tmp_path):
    baseline = load(make_eval(tmp_path / "src", "base", "base", 0, BASELINE))
    rows = baseline.read_jsonl("samples.jsonl")
    rows[0]["fluency_nll"] = float("nan")
    files = {rel: baseline.read_text(rel) for rel in baseline.manifest["files"]}
    files["samples.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows)
    broken = save(tmp_path / "base", "eval", tensors={}, config=baseline.config, model=None,
                  files=files, metrics=baseline.metrics).path
    arm = make_eval(tmp_path, "arm", "lora-npo", 1, WORKING)
    report = json.loads(gate(_gate_config(), broken, [arm], tmp_path / "g").read_text(
        "gate.json"))
    reasons = [g["reason"] for g in report["gates"] if "NaN" in g["reason"]]
    assert reasons and all(f"of the baseline {broken}" in r for r in reasons)


def test_f4_evaluate_out_on_its_adapter_is_refused_before_the_model_loads(files, tmp_path,
                                                                          monkeypatch):
    adapter = save(tmp_path / "adapter", "adapter", tensors={}, config={"method": "lora"},
                   model=None).path
    monkeypatch.setattr("mmie.evaluate.stage.measure", lambda *a, **k: pytest.fail("measured"))
    config = EvalConfig(model=LLAMA, forget=str(files["hi"]), retain=str(files["en"]),
                        n_prompts=4, max_new_tokens=4, adapter=str(adapter))
    with pytest.raises(ArtifactError, match="is the input"):
        evaluate(config, adapter, force=True)
    assert load(adapter, kind="adapter").config == {"method": "lora"}
