"""`mmie data continue`: prompts continued by a tiny model, kept by (patched) language label."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.data import split_prompt
from mmie.core.errors import DataError
from mmie.core.models import ModelSpec
from mmie.datacheck import continuations as cont
from tests.conftest import EN, write_jsonl

runner = CliRunner()
# one label per text of EN, in order: 6 kept, 3 degenerate, 3 in another language
LABELS = ["en", "degenerate", "en", "hi", "en", "en", "degenerate", "hi", "en", "und",
          "degenerate", "en"]


@pytest.fixture
def labelled(monkeypatch):
    seen = []

    def fake(texts):
        seen.extend(texts)
        return LABELS[:len(texts)]

    monkeypatch.setattr(cont, "labels", fake)
    return seen


def _config(path, **kw):
    return cont.ContinueConfig(str(path), "en", ModelSpec("tiny:llama"), max_new_tokens=4,
                               **kw)


def test_keeps_own_language_and_records_counts(tmp_path, labelled):
    src = write_jsonl(tmp_path / "en.jsonl", EN)
    out = tmp_path / "runs" / "en.cont.jsonl"
    report = cont.run(_config(src), out)
    rows = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    kept = [i for i, label in enumerate(LABELS) if label == "en"]
    assert len(rows) == len(kept) == 6
    for row, i, gen in zip(rows, kept, [labelled[i] for i in kept], strict=True):
        assert row == f"{split_prompt(EN[i])[0]} {gen.strip()}"
    side = json.loads((tmp_path / "runs" / "en.cont.jsonl.json").read_text(encoding="utf-8"))
    assert side == report
    assert side["counts"] == {"in": 12, "kept": 6,
                              "dropped": {"degenerate": 3, "other_language": 3},
                              "labels": {"en": 6, "degenerate": 3, "hi": 2, "und": 1}}
    assert side["input"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert side["model"]["name"] == "tiny:llama"
    assert side["settings"]["lang"] == "en" and side["settings"]["max_new_tokens"] == 4


def test_max_samples_and_bf16_head(tmp_path, labelled):
    src = write_jsonl(tmp_path / "en.jsonl", EN)
    report = cont.run(_config(src, max_samples=3, head_dtype="bf16"), tmp_path / "o.jsonl")
    assert report["counts"]["in"] == 3 and report["counts"]["kept"] == 2
    assert report["settings"]["head_dtype"] == "bf16"


def test_refuses_to_overwrite_without_force(tmp_path, labelled):
    src = write_jsonl(tmp_path / "en.jsonl", EN[:2])
    out = tmp_path / "o.jsonl"
    out.write_text("old\n", encoding="utf-8")
    with pytest.raises(DataError, match="--force"):
        cont.run(_config(src), out)
    assert out.read_text(encoding="utf-8") == "old\n"
    cont.run(_config(src), out, force=True)
    assert out.read_text(encoding="utf-8") != "old\n"
    with pytest.raises(DataError, match="input"):
        cont.run(_config(src), src, force=True)


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="head dtype"):
        cont.ContinueConfig("x.jsonl", "en", ModelSpec("tiny:llama"), head_dtype="fp8")
    with pytest.raises(ValueError, match="max_new_tokens"):
        cont.ContinueConfig("x.jsonl", "en", ModelSpec("tiny:llama"), max_new_tokens=0)


def test_cli(tmp_path, labelled):
    src = write_jsonl(tmp_path / "en.jsonl", EN)
    out = tmp_path / "o.jsonl"
    args = ["data", "continue", str(src), "--lang", "en", "--model", "tiny:llama",
            "--max-new-tokens", "4", "--out", str(out)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["kept"] == 6
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_cli_bad_head_dtype_exits_2(tmp_path):
    src = write_jsonl(tmp_path / "en.jsonl", EN)
    result = runner.invoke(app, ["data", "continue", str(src), "--lang", "en", "--model",
                                 "tiny:llama", "--head-dtype", "fp8", "--out",
                                 str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "head dtype" in result.output


def test_cli_empty_input_exits_1(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n", encoding="utf-8")
    result = runner.invoke(app, ["data", "continue", str(src), "--lang", "en", "--model",
                                 "tiny:llama", "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1 and "no non-empty texts" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_real_labeller_on_known_text():
    assert cont.labels(["the the the the the the the the the the"]) == ["degenerate"]


def test_nothing_in_the_language_is_an_error_and_keep_all_keeps_everything(tmp_path, labelled):
    src = write_jsonl(tmp_path / "en.jsonl", EN)
    with pytest.raises(DataError, match="none of 12 continuations is in 'pa'"):
        cont.run(cont.ContinueConfig(str(src), "pa", ModelSpec("tiny:llama"),
                                     max_new_tokens=4), tmp_path / "pa.jsonl")
    assert not (tmp_path / "pa.jsonl").exists()
    report = cont.run(_config(src, keep_all=True), tmp_path / "all.jsonl")
    assert report["counts"]["kept"] == 12


def test_continuations_are_generated_as_evaluate_generates():
    # evaluate's repetition penalty: without it the default model's continuations loop
    from mmie.evaluate.config import EvalConfig
    settings = _config("x.jsonl").generation()
    default = {f.name: f.default for f in __import__("dataclasses").fields(EvalConfig)}
    assert settings.repetition_penalty == default["repetition_penalty"] == 1.2
    assert settings.max_new_tokens == 4 and _config("x.jsonl").max_new_tokens == 4


def test_several_files_in_one_load_equal_one_run_each(tmp_path, labelled, monkeypatch):
    a, b = write_jsonl(tmp_path / "a.jsonl", EN[:5]), write_jsonl(tmp_path / "b.jsonl", EN[5:])
    loads, real = [], cont.loaded
    monkeypatch.setattr(cont, "loaded", lambda spec: loads.append(1) or real(spec))
    one = [cont.run(_config(src, keep_all=True), tmp_path / f"one-{src.name}")
           for src in (a, b)]
    assert len(loads) == 2
    many = cont.run_many([(_config(src, keep_all=True), tmp_path / f"many-{src.name}")
                          for src in (a, b)])
    assert len(loads) == 3  # once for both files
    for src, r1, r2 in zip((a, b), one, many, strict=True):
        assert (tmp_path / f"one-{src.name}").read_bytes() == \
            (tmp_path / f"many-{src.name}").read_bytes()
        assert r1["counts"] == r2["counts"] and r1["input"] == r2["input"]


def test_several_files_checks_before_loading(tmp_path, labelled):
    src = write_jsonl(tmp_path / "en.jsonl", EN[:3])
    same = tmp_path / "o.jsonl"
    with pytest.raises(DataError, match="same --out"):
        cont.run_many([(_config(src), same), (_config(src), same)])
    with pytest.raises(ValueError, match="same model and head dtype"):
        cont.run_many([(_config(src), tmp_path / "x.jsonl"),
                       (_config(src, head_dtype="bf16"), tmp_path / "y.jsonl")])


def test_cli_several_files(tmp_path, labelled):
    a, b = write_jsonl(tmp_path / "a.jsonl", EN[:6]), write_jsonl(tmp_path / "b.jsonl", EN[6:])
    base = ["data", "continue", str(a), str(b), "--lang", "en", "--model", "tiny:llama",
            "--max-new-tokens", "4"]
    outs = ["--out", str(tmp_path / "a.cont.jsonl"), "--out", str(tmp_path / "b.cont.jsonl")]
    result = runner.invoke(app, [*base, *outs, "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout)
    assert [r["counts"]["in"] for r in reports] == [6, 6]
    assert [r["settings"]["lang"] for r in reports] == ["en", "en"]
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "c.jsonl")])
    assert bad.exit_code == 2 and "once per file" in bad.output
