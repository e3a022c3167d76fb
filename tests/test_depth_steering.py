"""Steering recovery: the added direction is exactly what is added; rates count detections;
`mmie steer` summarises by hand-checkable counts and refuses prompts that trained the direction."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core.activations import harvest
from mmie.core.artifacts import load
from mmie.core.errors import DataError
from mmie.core.generation import GenerationSettings
from mmie.core.models import ModelSpec, loaded
from mmie.depth.steering import (
    SteeringConfig,
    SteerRunConfig,
    forget_rate,
    run,
    steered,
    steering_direction,
    steering_recovery,
    summarise,
)
from tests.conftest import EN, HI, write_jsonl

runner = CliRunner()

TINY = ModelSpec(name="tiny:llama", device="cpu")


def test_direction_is_the_difference_of_pooled_means_and_steering_adds_it():
    with loaded(TINY) as lm:
        direction = steering_direction(lm, HI[:4], EN[:4], 1)
        pooled = harvest(lm, HI[:4] + EN[:4], [1], token_sample=0).pooled[1]
        assert torch.allclose(direction, pooled[:4].mean(0) - pooled[4:].mean(0), atol=1e-5)
        assert torch.count_nonzero(steering_direction(lm, EN[:3], EN[:3], 1)) == 0
        before = harvest(lm, EN[:3], [1], token_sample=0).pooled[1]
        with steered(lm, 1, direction, 2.0):
            after = harvest(lm, EN[:3], [1], token_sample=0).pooled[1]
        assert torch.allclose(after - before, 2.0 * direction.expand_as(before), atol=1e-4)
        assert torch.equal(harvest(lm, EN[:3], [1], token_sample=0).pooled[1], before)


def test_forget_rate_counts_detected_languages():
    assert forget_rate([HI[0], EN[0], HI[1], EN[1]], "hi") == pytest.approx(0.5)


def test_steering_recovery_reports_a_rate_per_scale():
    config = SteeringConfig(forget_train=tuple(HI[:4]), replacement_train=tuple(EN[:4]),
                            prompts=tuple(EN[4:7]), layer=1, scales=(0.0, 4.0),
                            settings=GenerationSettings(max_new_tokens=6))
    got = steering_recovery(config, TINY)
    assert got["arm"] == "base" and [r["scale"] for r in got["rates"]] == [0.0, 4.0]
    assert all(0 <= r["forget_rate"] <= 1 and r["n"] == 3 for r in got["rates"])


def _files(tmp_path):
    return {n: write_jsonl(tmp_path / f"{n}.jsonl", t) for n, t in
            (("hi_train", HI[:4]), ("en_train", EN[:4]), ("prompts", HI[4:8]))}


def test_summary_counts_rates_and_recovery_by_hand():
    rows = lambda flags: [{"forget": f} for f in flags]  # noqa: E731
    got = {"base": {"0": rows([1, 1, 1, 0]), "1x2": rows([1, 1, 1, 1])},
           "arm": {"0": rows([0, 0, 0, 0]), "1x2": rows([1, 1, 0, 0])}}
    config = SteerRunConfig(forget_train="a", replacement_train="b", prompts="c", layers=(1,),
                            scales=(2.0,), n_boot=200)
    out = summarise(got, config)
    assert out["base"]["0"]["x"] == 3 and out["arm"]["1x2"]["rate"] == 0.5
    assert out["arm"]["0"]["low"] == 0 and 0 < out["arm"]["0"]["high"] < 1
    # (0 - 0.5) / (0 - 0.75): two thirds of what the arm removed came back
    assert out["recovery"]["1x2"]["value"] == pytest.approx(2 / 3)


def test_cli_steer_writes_a_steering_artifact_for_base_and_arm(tmp_path):
    from tests.test_nrows import _mask  # the arm here: a neuron mask, ablated

    f = _files(tmp_path)
    with loaded(TINY) as lm:
        _mask(lm, tmp_path / "mask")
    result = runner.invoke(app, [
        "steer", "--model", "tiny:llama", "--device", "cpu", "--forget-train",
        str(f["hi_train"]), "--replacement-train", str(f["en_train"]), "--prompts",
        str(f["prompts"]), "--layer", "1", "--scale", "4", "--neurons", str(tmp_path / "mask"),
        "--neuron-scale", "0", "--max-new-tokens", "4", "--n-boot", "100", "--out",
        str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    art = load(tmp_path / "s", kind="steering")
    assert set(art.metrics["base"]) == {"0", "1x4"} and art.metrics["arm"]["0"]["n"] == 4
    assert "1x4" in art.metrics["recovery"]
    assert {p["kind"] for p in art.manifest["parents"]} == {"neurons"}
    assert len(art.read_text("samples.jsonl").splitlines()) == 2 * 2 * 4
    from mmie.report.stage import ReportConfig
    from mmie.report.stage import run as report

    page = report(ReportConfig((str(tmp_path / "s"),), str(tmp_path / "r.html"))).read_text()
    base0 = art.metrics["base"]["0"]
    assert "Steering: does one direction" in page
    assert f"{base0['x']}/4 [{base0['low']:.2f}, {base0['high']:.2f}]" in page


def test_prompts_that_are_training_texts_are_refused(tmp_path):
    f = _files(tmp_path)
    config = SteerRunConfig(forget_train=str(f["hi_train"]), replacement_train=str(f["en_train"]),
                            prompts=str(f["hi_train"]), layers=(1,), model=TINY)
    with pytest.raises(DataError, match="direction-training"):
        run(config, tmp_path / "s")


def test_no_recovery_reads_as_zero_not_minus_zero():
    rows = lambda flags: [{"forget": f} for f in flags]  # noqa: E731
    got = {"base": {"0": rows([1, 1, 0]), "1x1": rows([1, 1, 1])},
           "arm": {"0": rows([0, 0, 0]), "1x1": rows([0, 0, 0])}}
    config = SteerRunConfig(forget_train="a", replacement_train="b", prompts="c", layers=(1,),
                            scales=(1.0,), n_boot=100)
    cell = summarise(got, config)["recovery"]["1x1"]
    assert all(f"{cell[k]:.2f}" == "0.00" for k in ("value", "low", "high") if k in cell)
