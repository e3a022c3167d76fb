import json
import re

from typer.testing import CliRunner

from mmie import __version__
from mmie.cli import app
from tests.conftest import REPO

runner = CliRunner()
STAGES = ["select-layers", "train-sae", "unlearn", "evaluate", "gate"]


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        if sub:
            for sub_name, sub_cmd in sub.items():
                yield f"{name} {sub_name}", sub_cmd
        else:
            yield name, cmd


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in STAGES + ["data", "model"]:
        assert name in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_every_command_has_help_and_is_in_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name, cmd in _commands():
        assert (cmd.help or "").strip(), f"'mmie {name}' has no help text"
        assert f"mmie {name}" in readme, f"'mmie {name}' is not documented in README.md"
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0, name


def test_usage_error_exits_2():
    result = runner.invoke(app, ["model", "info"])
    assert result.exit_code == 2


def test_runtime_error_exits_1_one_line(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 1
    assert "not found" in result.output and "Traceback" not in result.output


def test_model_info_json():
    result = runner.invoke(app, ["model", "info", "tiny:qwen2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["n_layers"] == 4 and data["d_model"] == 32 and re.fullmatch(
        r"[0-9a-f]{64}", data["fingerprint"]["weights_sha256"])


def test_unknown_model_exits_1():
    result = runner.invoke(app, ["model", "info", "tiny:nope"])
    assert result.exit_code == 1 and "unknown tiny model" in result.output


def test_data_check(text_files):
    result = runner.invoke(app, ["data", "check", str(text_files["hi"]), str(text_files["en"]),
                                 "--model", "tiny:llama", "--max-length", "48", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    hi, en = report["files"]
    assert hi["texts"] == 12 and hi["scripts"] == {"Deva": 1.0}
    assert en["languages"].get("en", 0) >= 0.9
    # byte-level tiny tokenizer: every Devanagari sentence is > 48 tokens, no English one is
    assert hi["truncated_share"] == 1.0 and en["truncated_share"] == 0.0
    assert report["overlap"] == [{"a": str(text_files["hi"]), "b": str(text_files["en"]),
                                  "shared": 0}]
