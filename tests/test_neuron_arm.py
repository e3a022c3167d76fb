"""Neurons as an evaluation arm: exclusive LAPE selection, scaling through `attached`, and
`mmie evaluate --adapter <neurons artifact>` on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmie.core.activations import tokenize
from mmie.core.artifacts import ModelIdentity, load, save
from mmie.core.errors import ArtifactError
from mmie.core.models import ModelSpec, loaded
from mmie.edits.interventions import attached
from mmie.edits.neurons import mask_tensors
from mmie.evaluate.stage import EvalConfig, run
from mmie.neurons.stage import SelectConfig, run_select
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

TINY = ModelSpec(name="tiny:llama", device="cpu")
IDENT = ModelIdentity("synthetic", "Synthetic", 1, 8, 10, {"weights_sha256": "ab"})




def _mask(path: Path, identity: ModelIdentity, selected: dict[int, list[int]], width: int = 64,
          **config) -> Path:
    masks = {i: torch.zeros(width, dtype=torch.bool) for i in range(identity.n_layers)}
    for i, idx in selected.items():
        masks[i][idx] = True
    save(path, "neurons", tensors=mask_tensors(masks), config={"role": "mask", **config},
         model=identity)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arm")
    with loaded(TINY) as lm:
        identity = lm.identity
    return {"mask": _mask(root / "mask", identity, {1: list(range(32)), 2: list(range(16))}),
            "exclusive": _mask(root / "excl", identity, {1: [0, 1, 2]}, exclusive=True),
            "hi": write_jsonl(root / "hi.jsonl", HI[:4]),
            "en": write_jsonl(root / "en.jsonl", EN[:4]), "root": root}


# --- exclusive selection ----------------------------------------------------------------------

def _probs(path: Path, values: list[float]) -> str:
    tensors = {"scores": {"layer0.act_prob": torch.tensor(values)}}
    save(path, "neurons", tensors=tensors, model=IDENT, config={"role": "scores"})
    return str(path)


def test_exclusive_lape_keeps_neurons_selected_for_no_other_language(tmp_path):
    langs = (("hi", _probs(tmp_path / "hi", [0.9, 0.9, 0.0, 0.9, 0.01])),
             ("ur", _probs(tmp_path / "ur", [0.0, 0.8, 0.0, 0.0, 0.01])),
             ("en", _probs(tmp_path / "en", [0.0, 0.0, 0.9, 0.0, 0.01])))
    # entropies 0, ~0.69, 0, 0, never active: the 4 lowest are specific; with a threshold of
    # 0.3, hi selects {0, 1, 3}, ur {1}, en {2}: neuron 1 fires on Hindi and Urdu alike
    kw = dict(method="lape", langs=langs, target_lang="hi", min_prob=0.3, lape_quantile=0.8)
    plain = run_select(SelectConfig(**kw), tmp_path / "plain")
    only = run_select(SelectConfig(**kw, exclusive=True), tmp_path / "only")
    assert plain.tensors("mask")["layer0.selected"].tolist() == [True, True, False, True, False]
    assert only.tensors("mask")["layer0.selected"].tolist() == [True, False, False, True, False]
    assert only.metrics["shared_with"] == {"ur": 1, "en": 0} and only.metrics["exclusive"]
    assert only.config["exclusive"] and not plain.metrics["exclusive"]
    with pytest.raises(ValueError, match="--exclusive applies to --lape"):
        SelectConfig(target="t", reference="r", exclusive=True)


def test_cli_select_exclusive(tmp_path):
    from mmie.cli import app

    args = ["neurons", "select", "--lape", "--min-prob", "0.3", "--lape-quantile", "0.8",
            "--exclusive", "-o", str(tmp_path / "m")]
    for name, values in (("hi", [0.9, 0.9, 0.0]), ("ur", [0.0, 0.8, 0.0])):
        args += ["--lang", f"{name}={_probs(tmp_path / name, values)}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "exclusive to hi" in " ".join(result.output.split())
    assert load(tmp_path / "m").tensors("mask")["layer0.selected"].tolist() == [True, False,
                                                                               False]


# --- scaling as an arm ------------------------------------------------------------------------

def test_scale_one_is_bit_identical_and_zero_changes_the_logits(tiny):
    with loaded(TINY) as lm, torch.no_grad():
        enc = tokenize(lm, EN[:2] + HI[:2], 64)
        plain = lm.model(**enc).logits
        with attached(lm, adapter=tiny["mask"], neuron_scale=1.0) as applied:
            one = lm.model(**enc).logits
        assert applied["arm"] == "neurons-x1" and applied["adapter"]["selected"] == 48
        with attached(lm, adapter=tiny["mask"]) as applied:  # a mask ablates by default
            zero = lm.model(**enc).logits
        assert applied["arm"] == "neurons-x0" and applied["adapter"]["scale"] == 0.0
        after = lm.model(**enc).logits
    assert torch.equal(one, plain)
    assert not torch.allclose(zero, plain)
    assert torch.equal(after, plain)  # the hooks are gone


def test_neuron_scale_needs_a_neurons_artifact(tiny, tmp_path):
    with loaded(TINY) as lm:
        other = save(tmp_path / "layers", "layers", tensors={}, config={}, model=lm.identity)
        with pytest.raises(ValueError, match="needs a neurons artifact"), \
                attached(lm, adapter=other.path, neuron_scale=0.5):
            pass
        with pytest.raises(ArtifactError, match="kind"), attached(lm, adapter=other.path):
            pass
    with pytest.raises(ValueError, match="--neuron-scale"):
        EvalConfig(model=TINY, forget=str(tiny["hi"]), retain=str(tiny["en"]), neuron_scale=0.0)


def _eval_config(tiny, **kw) -> EvalConfig:
    return EvalConfig(**{**dict(model=TINY, forget=str(tiny["hi"]), retain=str(tiny["en"]),
                                n_prompts=2, max_new_tokens=4, batch_size=2), **kw})


def test_evaluate_records_the_neuron_arm(tiny, tmp_path):
    art = run(_eval_config(tiny, adapter=str(tiny["exclusive"])), tmp_path / "excl")
    assert art.config["arm"] == "neurons-exclusive-x0"
    applied = art.config["interventions"]["adapter"]
    assert applied["kind"] == "neurons" and applied["scale"] == 0.0 and applied["selected"] == 3
    assert [p["kind"] for p in art.manifest["parents"]] == ["neurons"]
    assert art.config["seed"] == 0  # no training seed: the evaluation seed


def test_cli_evaluate_neurons_at_scale_one_matches_the_base_model(tiny, tmp_path):
    from mmie.cli import app

    base = run(_eval_config(tiny), tmp_path / "base")
    args = ["evaluate", "--model", "tiny:llama", "--device", "cpu", "--forget", str(tiny["hi"]),
            "--retain", str(tiny["en"]), "--n-prompts", "2", "--max-new-tokens", "4",
            "--batch-size", "2", "--adapter", str(tiny["mask"]), "--neuron-scale", "1",
            "--out", str(tmp_path / "one"), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["arm"] == "neurons-x1"
    one = load(tmp_path / "one")
    strip = lambda rows: [{k: r[k] for k in ("set", "idx", "generation")} for r in rows]  # noqa: E731
    assert strip(one.read_jsonl("samples.jsonl")) == strip(base.read_jsonl("samples.jsonl"))
    assert one.read_jsonl("ppl.jsonl") == base.read_jsonl("ppl.jsonl")
    zero = run(_eval_config(tiny, adapter=str(tiny["mask"])), tmp_path / "zero")
    assert zero.config["arm"] == "neurons-x0"
    assert zero.read_jsonl("ppl.jsonl") != base.read_jsonl("ppl.jsonl")
