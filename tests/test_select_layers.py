"""select-layers: rules on hand-set rows, LAPE counts, end-to-end runs on tiny models, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from mmie.core.artifacts import load
from mmie.core.errors import DataError, MetricError
from mmie.core.models import ModelSpec, load_model
from mmie.layers.rules import (
    STRATEGIES,
    UNPAIRED_REASON,
    LayerRow,
    choose,
    lape_counts,
    measure_layer,
    zscores,
)
from mmie.layers.stage import LAPE_SITES, SelectLayersConfig, read_sets, resolve_site, run

HI_WORDS = "मैं तुम वह घर पानी किताब स्कूल बाज़ार आज कल बहुत अच्छा जाता है थी गया".split()
EN_WORDS = "I you he house water book school market today tomorrow very good goes is was".split()
UR_WORDS = "میں تم وہ گھر پانی کتاب اسکول بازار آج کل بہت اچھا جاتا ہے".split()


def _sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(4, 9))) for _ in range(n)]


def _write(path, lines: list[str]):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    return {"hi": _write(root / "hi.txt", _sentences(HI_WORDS, 12, 1)),
            "en": _write(root / "en.txt", _sentences(EN_WORDS, 12, 2)),
            "ur": _write(root / "ur.txt", _sentences(UR_WORDS, 12, 3)),
            "en9": _write(root / "en9.txt", _sentences(EN_WORDS, 9, 4)),
            "empty": _write(root / "empty.txt", ["", "  "])}


def _config(files, arch="llama", **kw) -> SelectLayersConfig:
    return SelectLayersConfig(forget=str(files["hi"]), retain=str(files["en"]),
                              model=ModelSpec(name=f"tiny:{arch}"), **kw)


@pytest.fixture(scope="module")
def llama_artifact(files, tmp_path_factory):
    return run(_config(files), tmp_path_factory.mktemp("runs") / "llama")


# ---------------------------------------------------------------- rules on hand-set rows


def _rows(auc: list[float], cka: list[float | None]) -> list[LayerRow]:
    rows = []
    for i, (a, c) in enumerate(zip(auc, cka, strict=True)):
        values = {"probe_auc": a} | ({"debiased_cka": c} if c is not None else {})
        missing = {} if c is not None else {"debiased_cka": "constant activations"}
        rows.append(LayerRow(i, candidate=True, values=values, missing=missing))
    return rows


def test_zscores_use_the_spread_floor():
    flat = zscores({0: 1.0, 1: 1.0, 2: 0.9999}, min_spread=0.01)
    assert max(abs(v) for v in flat.values()) < 0.01
    steep = zscores({0: 0.0, 1: 1.0}, min_spread=0.01)
    assert steep == pytest.approx({0: -1.0, 1: 1.0})


def test_probe_cka_prefers_separable_dissimilar_layers_and_explains_why():
    rows = _rows(auc=[0.6, 0.9, 0.9, 0.7], cka=[0.9, 0.2, 0.5, 0.9])
    choice = choose(rows, STRATEGIES["probe-cka"], top_k=2, min_spread=0.01)
    assert choice.chosen == [1, 2]
    reason = choice.reasons["1"]
    assert reason["rank"] == 1 and reason["terms"]["debiased_cka"]["value"] == 0.2
    assert "debiased_cka=0.2" in reason["text"] and "lower is better" in reason["text"]


def test_ties_are_broken_by_the_lower_layer():
    rows = _rows(auc=[0.8, 0.8, 0.8], cka=[0.5, 0.5, 0.5])
    assert choose(rows, STRATEGIES["probe-cka"], top_k=2, min_spread=0.01).chosen == [0, 1]


def test_a_missing_metric_counts_as_average_and_keeps_its_reason():
    rows = _rows(auc=[0.7, 0.9, 0.8], cka=[0.1, None, 0.9])
    choice = choose(rows, STRATEGIES["probe-cka"], top_k=3, min_spread=0.01)
    assert rows[1].score == pytest.approx(zscores({0: 0.7, 1: 0.9, 2: 0.8}, 0.01)[1])
    assert choice.reasons["1"]["terms"]["debiased_cka"]["missing"] == "constant activations"


def test_a_metric_missing_everywhere_is_dropped_or_fails_clearly():
    rows = _rows(auc=[0.7, 0.9], cka=[None, None])
    choice = choose(rows, STRATEGIES["probe-cka"], top_k=1, min_spread=0.01)
    assert choice.chosen == [1] and "constant activations" in choice.dropped["debiased_cka"]
    with pytest.raises(MetricError, match="no usable metric"):
        choose(_rows([0.7, 0.9], [None, None]), STRATEGIES["cka"], top_k=1, min_spread=0.01)


def test_non_candidates_are_never_chosen():
    rows = _rows(auc=[0.5, 0.6, 1.0], cka=[0.5, 0.5, 0.0])
    rows[2].candidate = False
    choice = choose(rows, STRATEGIES["probe-cka"], top_k=2, min_spread=0.01)
    assert 2 not in choice.chosen and rows[2].score is None


def test_measure_layer_records_constant_and_nan_inputs_as_missing():
    const = torch.ones(10, 4)
    row = measure_layer(0, const, const.clone(), paired=True, folds=5, seed=0, candidate=True)
    assert not row.values and set(row.missing) >= {"debiased_cka", "probe_auc", "anc"}
    assert "constant" in row.missing["probe_auc"]
    bad = torch.randn(10, 4)
    bad[3, 1] = float("nan")
    row = measure_layer(0, bad, torch.randn(10, 4), paired=True, folds=5, seed=0, candidate=True)
    assert "NaN" in row.missing["linear_cka"] and "NaN" in row.missing["probe_auc"]


def test_unpaired_rows_skip_paired_metrics_but_keep_the_probe():
    x, y = torch.randn(10, 4), torch.randn(10, 4) + 3
    row = measure_layer(0, x, y, paired=False, folds=5, seed=0, candidate=True)
    assert row.missing["debiased_cka"] == UNPAIRED_REASON
    assert row.values["probe_auc"] == pytest.approx(1.0)


def test_lape_counts_a_neuron_active_for_one_language_only():
    prob = torch.full((3, 2, 50), 0.3)
    prob[0, 1, 7] = 0.95        # layer 1, neuron 7: only language 'hi' fires
    prob[:2, 0, 3] = 0.9        # layer 0, neuron 3: 'hi' and 'ur' fire, 'en' does not
    result = lape_counts(prob, ["hi", "ur", "en"], entropy_quantile=0.02, prob_quantile=0.95)
    assert result.counts[1] == {"hi": 1, "ur": 0, "en": 0}
    assert result.counts[0] == {"hi": 1, "ur": 1, "en": 0}
    assert result.selected == 2
    with pytest.raises(MetricError, match="at least 2 languages"):
        lape_counts(prob[:1], ["hi"], entropy_quantile=0.01, prob_quantile=0.95)


# ---------------------------------------------------------------- config and data


@pytest.mark.parametrize("kw, match", [
    ({"top_k": 0}, "top-k"), ({"folds": 1}, "folds"), ({"strategy": "nope"}, "known: cka"),
    ({"pairing": "maybe"}, "pairing"), ({"langs": (("hi", "a.txt"),)}, "at least two"),
    ({"langs": (("hi", "a"), ("hi", "b"))}, "repeat"), ({"max_samples": 3}, "below folds"),
])
def test_config_rejects_bad_settings(files, kw, match):
    with pytest.raises(ValueError, match=match):
        _config(files, **kw)


def test_unaligned_files_are_truncated_and_marked_unpaired(files):
    sets = read_sets(SelectLayersConfig(forget=str(files["hi"]), retain=str(files["en9"])))
    assert not sets.paired and len(sets.forget) == len(sets.retain) == 9
    with pytest.raises(DataError, match="line-aligned"):
        read_sets(SelectLayersConfig(forget=str(files["hi"]), retain=str(files["en9"]),
                                     pairing="yes"))


def test_bad_data_fails_before_any_model_loads(files, tmp_path, monkeypatch):
    def no_model(spec):
        raise AssertionError("the model must not load before the data is checked")

    monkeypatch.setattr("mmie.layers.stage.loaded", no_model)
    empty = SelectLayersConfig(forget=str(files["empty"]), retain=str(files["en"]))
    with pytest.raises(DataError, match="no non-empty texts"):
        run(empty, tmp_path / "a")
    few = _write(tmp_path / "few.txt", ["a b", "c d", "e f"])
    with pytest.raises(DataError, match="fewer than the 5 probe folds"):
        run(SelectLayersConfig(forget=str(few), retain=str(few)), tmp_path / "b")


def test_lape_site_resolution_falls_back_when_act_fn_is_missing():
    lm = load_model(ModelSpec(name="tiny:llama"))
    site, found = resolve_site(lm.blocks, "auto")
    assert site == "act_fn" and found[0][0] is lm.blocks[0].mlp.act_fn
    for block in lm.blocks:
        del block.mlp.act_fn
    site, found = resolve_site(lm.blocks, "auto")
    assert site == "down_proj_input" and found[2] == (lm.blocks[2].mlp.down_proj, True)
    assert list(LAPE_SITES)[-1] == "block"


# ---------------------------------------------------------------- end to end


def test_llama_run_writes_a_loadable_layers_artifact(llama_artifact):
    art = load(llama_artifact.path, kind="layers")
    chosen = art.metrics["chosen"]
    assert len(chosen) == 3 and all(isinstance(i, int) for i in chosen)
    assert 3 not in chosen and art.metrics["candidates"] == [0, 1, 2]   # 4 blocks, last out
    assert set(art.metrics["reasons"]) == {str(i) for i in chosen}
    assert art.metrics["paired"] is True and art.metrics["n_samples"] == 12
    pooled = art.tensors("pooled")
    assert set(pooled) == {f"{s}.L{i}" for s in ("forget", "retain") for i in range(4)}
    assert pooled["forget.L2"].shape == (12, 32) and pooled["forget.L2"].dtype == torch.float32
    assert not torch.equal(pooled["forget.L2"], pooled["retain.L2"])
    assert json.loads(art.read_text("layers.json"))["chosen"] == chosen
    assert (art.path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert art.config["model"]["name"] == "tiny:llama" and art.model.n_layers == 4


def test_llama_rows_carry_every_metric(llama_artifact):
    rows = llama_artifact.metrics["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert row["missing"] == {}
        assert 0.5 <= row["probe_auc"] <= 1.0 and -1 <= row["debiased_cka"] <= 1
    assert rows[3]["score"] is None and rows[3]["candidate"] is False


def test_gemma3_with_language_sets_is_deterministic(files, tmp_path):
    langs = (("hi", str(files["hi"])), ("ur", str(files["ur"])), ("en", str(files["en"])))
    config = _config(files, "gemma3", langs=langs, seed=3, token_sample=16)
    first, second = run(config, tmp_path / "a"), run(config, tmp_path / "b")
    assert first.metrics["chosen"] == second.metrics["chosen"]
    assert first.metrics["layers"] == second.metrics["layers"]
    lape = first.metrics["lape"]
    assert lape["site"] == "act_fn" and lape["languages"] == ["hi", "ur", "en"]
    assert set(lape["counts"]) == {"0", "1", "2", "3"} and lape["selected"] >= 1
    assert first.tensors("lape")["prob"].shape == (3, 4, 64)
    assert first.tensors("tokens")["forget.L0"].shape == (16, 32)


def test_include_last_and_too_large_top_k(files, tmp_path):
    art = run(_config(files, top_k=4, include_last=True, strategy="probe"), tmp_path / "a")
    assert sorted(art.metrics["chosen"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="top-k 4 is more than the 3 candidate layers"):
        run(_config(files, top_k=4), tmp_path / "b")


def test_unpaired_run_uses_the_probe_and_refuses_a_cka_only_rule(files, tmp_path):
    config = SelectLayersConfig(forget=str(files["hi"]), retain=str(files["en9"]),
                                model=ModelSpec(name="tiny:llama"))
    art = run(config, tmp_path / "a")
    assert art.metrics["paired"] is False and art.metrics["n_samples"] == 9
    assert art.metrics["layers"][0]["debiased_cka"] is None
    assert "debiased_cka" in art.metrics["strategy"]["dropped"]
    with pytest.raises(MetricError, match="no usable metric"):
        run(SelectLayersConfig(forget=str(files["hi"]), retain=str(files["en9"]),
                               model=ModelSpec(name="tiny:llama"), strategy="cka"),
            tmp_path / "b")


# ---------------------------------------------------------------- CLI

runner = CliRunner()


def _cli(files, out, *extra):
    from mmie.cli import app

    args = ["select-layers", "--model", "tiny:llama", "--forget", str(files["hi"]),
            "--retain", str(files["en"]), "--out", str(out), *extra]
    return runner.invoke(app, args)


def test_cli_writes_artifact_png_and_json(files, tmp_path):
    result = _cli(files, tmp_path / "sl", "--json", "--top-k", "2",
                  "--lang", f"hi={files['hi']}", "--lang", f"en={files['en']}")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    art = load(tmp_path / "sl", kind="layers")
    assert summary["chosen"] == art.metrics["chosen"] and len(summary["chosen"]) == 2
    assert (tmp_path / "sl" / "layers.png").is_file()
    assert "chosen layers" in result.stderr and "dCKA" in result.stderr


def test_cli_refuses_an_existing_artifact_without_force(files, llama_artifact):
    result = _cli(files, llama_artifact.path)
    assert result.exit_code == 1 and "--force" in result.stderr


def test_cli_empty_forget_file_is_one_clear_error(files, tmp_path):
    from mmie.cli import app

    result = runner.invoke(app, ["select-layers", "-m", "tiny:llama", "--forget",
                                 str(files["empty"]), "--retain", str(files["en"]),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "no non-empty texts" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra", [["--top-k", "0"], ["--lang", "hi-no-file"],
                                   ["--strategy", "nope"]])
def test_cli_bad_settings_exit_2(files, tmp_path, extra):
    result = _cli(files, tmp_path / "x", *extra)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x").exists()
