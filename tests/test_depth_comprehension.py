"""Comprehension: retrieval metrics equal hand computations; a tiny run writes its artifact."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.artifacts import load
from mmie.core.errors import MetricError
from mmie.core.models import ModelSpec
from mmie.depth.comprehension import ComprehensionConfig, run
from mmie.depth.retrieval import aligned_ranks, chance_mrr, cosine_matrix, retrieval, retrieve
from tests.conftest import SAMPLE

runner = CliRunner()


def test_identity_aligned_embeddings_retrieve_perfectly():
    x = np.random.default_rng(0).normal(size=(6, 4))
    got, ranks = retrieve(x, x.copy())
    assert ranks.tolist() == [1] * 6
    assert (got.top1, got.mrr, got.n) == (1.0, 1.0, 6)
    assert got.chance_top1 == pytest.approx(1 / 6)


def test_known_permutation_gives_known_mrr():
    # one-hot rows; centring gives cos = 1 on the match and -1/3 elsewhere (ties)
    query = np.eye(4)
    pivot = query[[0, 2, 1, 3]]  # rows 1 and 2 swapped: their aligned pivot ties with 2 others
    assert cosine_matrix(query, pivot)[1, 2] == pytest.approx(1.0)
    assert cosine_matrix(query, pivot)[1, 1] == pytest.approx(-1 / 3)
    got, ranks = retrieve(query, pivot)
    assert ranks.tolist() == [1, 4, 4, 1]  # ties count against the aligned sentence
    assert got.top1 == 0.5
    assert got.mrr == pytest.approx((1 + 1 / 4 + 1 / 4 + 1) / 4)


def test_ranks_from_a_hand_similarity_matrix():
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.3, 0.2], [0.1, 0.2, 0.7]])
    ranks = aligned_ranks(sim)
    assert ranks.tolist() == [1, 2, 1]
    got = retrieval(ranks)
    assert got.top1 == pytest.approx(2 / 3) and got.mrr == pytest.approx((1 + 0.5 + 1) / 3)


def test_chance_levels_and_collapsed_states():
    assert chance_mrr(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    got, ranks = retrieve(np.ones((5, 3)), np.ones((5, 3)))  # nothing left after centring
    assert ranks.tolist() == [5] * 5 and got.top1 == 0.0


def test_mismatched_or_bad_inputs_are_refused():
    with pytest.raises(MetricError, match="line-aligned"):
        retrieve(np.eye(3), np.eye(4))
    with pytest.raises(MetricError, match="NaN"):
        retrieve(np.full((3, 2), np.nan), np.eye(3)[:, :2])


def test_config_refuses_an_unknown_forget_language():
    with pytest.raises(ValueError, match="forget language"):
        ComprehensionConfig(pivot="en.txt", langs=(("ur", "ur.txt"),), forget="hi")


def _config(**kw) -> ComprehensionConfig:
    langs = (("hi", str(SAMPLE / "hi.jsonl")), ("ur", str(SAMPLE / "ur.jsonl")))
    return ComprehensionConfig(pivot=str(SAMPLE / "en.jsonl"), langs=langs, max_samples=8,
                               folds=2, n_boot=200, layers=(0, 1), max_length=32,
                               model=ModelSpec(name="tiny:llama", device="cpu"), **kw)


def test_tiny_run_writes_the_artifact(tmp_path):
    art = run(_config(), tmp_path / "comp")
    again = load(tmp_path / "comp", kind="comprehension")
    assert again.metrics["layers"] == [0, 1] and art.metrics["n"] == 8
    cell = again.metrics["base"]["retrieval"]["hi"]["1"]
    assert 0 <= cell["top1"] <= 1 and cell["chance_top1"] == pytest.approx(1 / 8)
    assert set(again.metrics["base"]["probe"]) == {"0", "1"}
    ranks = again.read_jsonl("ranks.jsonl")
    assert len(ranks) == 2 * 2 * 8 and {r["condition"] for r in ranks} == {"base"}
    assert (tmp_path / "comp" / "retrieval.png").stat().st_size > 0


def test_cli_comprehension(tmp_path):
    out = tmp_path / "c"
    result = runner.invoke(app, [
        "comprehension", "--pivot", str(SAMPLE / "en.jsonl"),
        "--pair", f"hi={SAMPLE / 'hi.jsonl'}", "--pair", f"bn={SAMPLE / 'bn.jsonl'}",
        "--out", str(out), "--model", "tiny:qwen2", "--device", "cpu", "--layers", "0-1",
        "--max-samples", "6", "--folds", "2", "--n-boot", "100", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    assert load(out, kind="comprehension").metrics["forget"] == "hi"


def test_arm_is_measured_next_to_base(tmp_path):
    from mmie.core.models import loaded
    from mmie.depth.arms import ArmSpec
    from mmie.edits.interventions import fit_scrub
    from tests.conftest import EN, HI

    with loaded(ModelSpec(name="tiny:llama", device="cpu")) as lm:
        fit_scrub(lm, HI, EN, [0, 1], tmp_path / "scrub")
    art = run(_config(arm=ArmSpec(scrub=str(tmp_path / "scrub"))), tmp_path / "comp")
    assert art.metrics["arm_name"] == "base+scrub"
    assert set(art.metrics["change_top1"]) == {"hi", "ur"}
    change = art.metrics["change_top1"]["hi"]["1"]["value"]
    base, arm = (art.metrics[c]["retrieval"]["hi"]["1"]["top1"] for c in ("base", "arm"))
    assert change == pytest.approx(arm - base)
    assert art.config["applied"]["scrub"]["layers"] == [0, 1]
