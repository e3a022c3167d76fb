"""`mmie sweep`: the grid, the winner rule, and the "test set is read once" contract on a
2-run grid of tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mmie.core.data
import mmie.evaluate.stage
import mmie.unlearn.stage
from mmie.cli import app
from mmie.core.artifacts import load
from mmie.core.errors import DataError
from mmie.sweep.grid import SweepConfig, load_grid, parse_axis
from mmie.sweep.stage import check_test_held_out, pick
from mmie.unlearn.valscore import Scorer
from tests.conftest import EN, HI, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
UR = ["میں آج بازار جا رہا ہوں", "یہ کتاب بہت اچھی ہے", "بارش کے بعد موسم ٹھنڈا ہو گیا"]
SPLITS = {"hi": HI[:6], "en": EN[:6], "hi_val": HI[6:9], "en_val": EN[6:9], "ur_val": UR,
          "hi_test": HI[9:], "en_test": EN[9:]}


def grid_text(f: dict[str, Path], extra: str = "") -> str:
    return f"""
[unlearn]
forget = "{f['hi']}"
retain = ["{f['en']}"]
steps = 2
batch_size = 2
max_length = 80
rank = 2
checkpoint_every = 0

[validation]
forget = "{f['hi_val']}"
retain = "{f['en_val']}"
protect = {{ ur = "{f['ur_val']}" }}
every = 1

[test]
forget = "{f['hi_test']}"
retain = "{f['en_test']}"
n_prompts = 2
max_new_tokens = 2
batch_size = 4
max_length = 64

[grid]
method = ["lora"]
lr = [1e-3, 1e-2]
{extra}"""


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in SPLITS.items()}


def test_grid_multiplies_each_objective_by_its_own_options(files, tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(grid_text(files, """objective = ["npo", "redirect"]
[grid.objective_options]
redirect = [{ base = "npo", redirect_weight = 1.0 }, { redirect_weight = 0.5 }]
"""))
    points = load_grid(path).points()
    assert len(points) == 2 * (1 + 2)  # lr x (npo with defaults + redirect x 2 options)
    assert [p.name for p in points][1:3] == ["r02-lora-npo-lr0.01", "r03-lora-redirect-lr0.001-"
                                             "basenpo-redirect_weight1.0"]
    assert points[2].overrides["objective_options"] == {"base": "npo", "redirect_weight": "1.0"}
    again = load_grid(path, ["lr=0.5", "objective=npo"]).points()
    assert [p.overrides for p in again] == [{"method": "lora", "objective": "npo", "lr": 0.5}]
    assert parse_axis("steps=10, 20") == ("steps", (10, 20))
    with pytest.raises(ValueError, match="unknown grid axis beta"):
        SweepConfig(unlearn={"a": 1}, validation={"forget": "f", "retain": "r"},
                    test={"forget": "f", "retain": "r"}, axes=(("beta", (1,)),))


def test_winner_rule_on_hand_set_rows():
    rows = [{"run": "a", "qualified": False, "forget_mass": 0.01},
            {"run": "b", "qualified": True, "forget_mass": 0.30},
            {"run": "c", "qualified": True, "forget_mass": 0.20},
            {"run": "d", "qualified": True, "forget_mass": 0.20}]
    assert pick(rows)["run"] == "c"  # met the rule, lowest mass, earlier of the tie
    assert pick([rows[0], {"run": "e", "qualified": False, "forget_mass": None}])["run"] == "a"


def test_a_test_text_seen_in_training_is_refused(files, tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(grid_text(files).replace(str(files["en_test"]), str(files["en"])))
    with pytest.raises(DataError, match="also training or validation texts"):
        check_test_held_out(load_grid(path))


def test_the_test_set_is_read_once_for_the_winner_only(files, tmp_path, monkeypatch):
    # scripted validation measures (the tiny tokenizer's token sets are empty): run 1 (lr 1e-3)
    # ends at forget mass 0.5, run 2 (lr 1e-2) at 0.3, both keeping Urdu and perplexity
    script = iter([0.8, 0.6, 0.5, 0.8, 0.4, 0.3])
    monkeypatch.setattr(Scorer, "measure", lambda self, adapter: {
        "forget_mass": next(script), "own_mass": {"ur": 0.5}, "leakage": {"ur": 0.0},
        "retain_nll": 2.0, "seconds": 0.0})
    phase, reads, evaluated = ["setup"], [], []
    real_read, real_train = mmie.core.data.read_raw, mmie.unlearn.stage.run
    real_eval = mmie.evaluate.stage.run

    def read(source):
        reads.append((str(source.path), phase[0]))
        return real_read(source)

    def train(*args, **kw):
        phase[0] = "training"
        try:
            return real_train(*args, **kw)
        finally:
            phase[0] = "between"

    def evaluate(config, out, **kw):
        evaluated.append(config.adapter)
        phase[0] = "evaluate"
        return real_eval(config, out, **kw)

    monkeypatch.setattr(mmie.core.data, "read_raw", read)
    monkeypatch.setattr(mmie.unlearn.stage, "run", train)
    monkeypatch.setattr(mmie.evaluate.stage, "run", evaluate)
    grid = tmp_path / "g.toml"
    grid.write_text(grid_text(files))
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(grid), "--out", str(out), "--model",
                                      "tiny:llama", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    art = load(out, kind="sweep")
    runs = art.metrics["runs"]
    assert [r["run"] for r in runs] == ["r01-lora-lr0.001", "r02-lora-lr0.01"]
    assert [r["forget_mass"] for r in runs] == [0.5, 0.3]
    assert all(r["qualified"] and r["chosen_step"] == 2 for r in runs)
    assert art.metrics["winner"] == "r02-lora-lr0.01"
    assert evaluated == [runs[1]["adapter"]]  # one evaluation, of the winner
    test_files = {str(files["hi_test"]), str(files["en_test"])}
    test_reads = [p for path, p in reads if path in test_files]
    assert test_reads and "training" not in test_reads and "setup" not in test_reads
    assert load(art.metrics["test"]["eval"], kind="eval").config["adapter"] == runs[1]["adapter"]
    assert "forget.forget_rate" in art.metrics["test"]["metrics"]
    table = art.read_text("sweep.md")
    assert all(r["run"] in table for r in runs) and "Winner (validation only)" in table
    assert [json.loads(x)["run"] for x in art.read_text("runs.jsonl").splitlines()] == \
        [r["run"] for r in runs]
    assert json.loads(result.stdout)["winner"] == "r02-lora-lr0.01"


def test_default_grid_and_the_alternative_only_where_read(tmp_path):
    from mmie.cli.sweep import eval_config, unlearn_config
    from mmie.core.models import ModelSpec
    from tests.conftest import REPO

    config = load_grid(REPO / "configs" / "sweep.toml")
    points = config.points()
    assert len(points) == 12
    spec = ModelSpec(name="tiny:llama", device="cpu")
    by_objective = {p.overrides["objective"]: unlearn_config(config, p.overrides, spec)
                    for p in points}
    assert by_objective["npo"].alternative is None
    assert by_objective["redirect"].alternative == "runs/splits/en.train.jsonl"
    assert dict(by_objective["redirect"].validation.protect)["bn"] == "runs/splits/bn.val.jsonl"
    test = eval_config(config, tmp_path / "adapter", spec)
    assert dict(test.xlang)["ur"] == "runs/splits/ur.test.jsonl" and test.n_prompts == 60


def test_a_grid_without_validation_is_a_usage_error(files, tmp_path):
    grid = tmp_path / "g.toml"
    text = grid_text(files)
    grid.write_text(text[:text.index("[validation]")] + text[text.index("[test]"):])
    result = CliRunner().invoke(app, ["sweep", str(grid), "--out", str(tmp_path / "s"),
                                      "--model", "tiny:llama"])
    assert result.exit_code == 2 and "'validation' table" in result.output
    assert not (tmp_path / "s.runs").exists()  # refused before any run


def test_the_gate_probe_goes_to_glora_runs_only():
    from mmie.cli.sweep import unlearn_config
    from mmie.core.models import ModelSpec
    from tests.conftest import REPO

    config = load_grid(REPO / "configs" / "sweep.toml")
    config.unlearn["gate_probe"] = "runs/langgate"
    spec = ModelSpec(name="tiny:llama", device="cpu")
    point = config.points()[0].overrides
    assert unlearn_config(config, {**point, "method": "lora"}, spec).gate_probe is None
    assert unlearn_config(config, {**point, "method": "glora"}, spec).gate_probe == \
        "runs/langgate"
