"""Objectives with a positive target (redirect, dpo): formulas on hand-made tensors, the
prompt-continuation rows and their gradients on a tiny model, and `mmie unlearn --alternative`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmie.core import losses
from mmie.core.artifacts import load, sha256_file
from mmie.core.errors import DataError
from mmie.core.models import ModelSpec, loaded, unwrap
from mmie.unlearn.data import collate, forward
from mmie.unlearn.objectives import Needs, ObjectiveInputs, get_objective
from mmie.unlearn.pairs import FALLBACK, build_rows, choose, read_aligned, texts_sha256
from mmie.unlearn.stage import UnlearnConfig, read_data
from tests.conftest import EN, HI, write_jsonl

LLAMA = ModelSpec(name="tiny:llama", device="cpu")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")


def _leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("redirect")
    return {"hi": write_jsonl(root / "hi.jsonl", HI), "en": write_jsonl(root / "en.jsonl", EN),
            "short": write_jsonl(root / "short.jsonl", EN[:5])}


# --- formulas ---------------------------------------------------------------------------------

def test_redirect_alone_is_the_token_pooled_nll_of_the_alternative():
    alt, n = _leaf([-3.0, -5.0]), torch.tensor([2.0, 3.0], dtype=torch.float64)
    objective = get_objective("redirect", redirect_weight=0.5, retain_weight=0.0)
    loss = objective.loss(ObjectiveInputs(alt_logp=alt, alt_n_tokens=n))
    assert loss.item() == pytest.approx(0.5 * 8.0 / 5.0, rel=1e-12)
    loss.backward()  # descent raises every alternative's likelihood, per token alike
    torch.testing.assert_close(alt.grad, torch.full((2,), -0.5 / 5.0, dtype=torch.float64))
    assert objective.needs == Needs(alternative=True)


def test_redirect_plus_npo_adds_the_npo_term_and_one_retain_term():
    inputs = ObjectiveInputs(
        alt_logp=_leaf([-4.0]), alt_n_tokens=torch.tensor([4.0], dtype=torch.float64),
        logp=_leaf([-10.0, -20.0]), n_tokens=torch.tensor([4.0, 6.0], dtype=torch.float64),
        ref_logp=torch.tensor([-12.0, -18.0], dtype=torch.float64),
        retain_loss=torch.tensor(2.0, dtype=torch.float64))
    objective = get_objective("redirect", base="npo", beta=0.1, redirect_weight=2.0,
                              retain_weight=0.5)
    npo = (-20 * _logsigmoid(-0.2) - 20 * _logsigmoid(0.2)) / 2  # log ratios +2 and -2
    terms = objective.forget_terms(inputs)
    assert set(terms) == {"alternative", "sequence"}
    assert terms["alternative"].item() == pytest.approx(2.0 * 1.0)
    assert terms["sequence"].item() == pytest.approx(npo, rel=1e-12)
    assert objective.loss(inputs).item() == pytest.approx(2.0 + npo + 0.5 * 2.0, rel=1e-12)
    needs = objective.needs
    assert needs.alternative and needs.logprobs and needs.reference_logprobs
    assert not needs.continuation and not needs.reference_alternative


def test_redirect_plus_simnpo_uses_its_beta_and_gamma():
    inputs = ObjectiveInputs(alt_logp=_leaf([-2.0]), alt_n_tokens=torch.tensor([2.0]),
                             logp=_leaf([-8.0]), n_tokens=torch.tensor([4.0]))
    objective = get_objective("redirect", base="simnpo", beta=2.0, gamma=0.5, retain_weight=0.0)
    simnpo = -(2 / 2.0) * _logsigmoid(-(2.0 / 4.0) * -8.0 - 0.5)
    assert objective.loss(inputs).item() == pytest.approx(1.0 + simnpo, rel=1e-6)
    assert not objective.needs.reference_logprobs


@pytest.mark.parametrize(("options", "match"), [
    ({"base": "ga"}, "base must be one of none, npo, simnpo"),
    ({"redirect_weight": 0.0}, "redirect_weight"),
    ({"beta": 0.2}, "base=none has none"),
    ({"base": "npo", "gamma": 1.0}, "needs base=simnpo"),
    ({"base": "npo", "beta": -1.0}, "beta"),
])
def test_redirect_config_validates(options, match):
    with pytest.raises(ValueError, match=match):
        get_objective("redirect", **options)


def test_dpo_equals_its_formula():
    chosen, rejected = _leaf([-6.0, -9.0]), _leaf([-5.0, -4.0])
    ref_c = torch.tensor([-7.0, -8.0], dtype=torch.float64)
    ref_r = torch.tensor([-5.5, -6.0], dtype=torch.float64)
    inputs = ObjectiveInputs(logp=rejected, n_tokens=torch.tensor([3.0, 3.0]), ref_logp=ref_r,
                             alt_logp=chosen, alt_n_tokens=torch.tensor([2.0, 4.0]),
                             ref_alt_logp=ref_c, retain_loss=torch.tensor(1.5))
    beta = 0.3
    objective = get_objective("dpo", beta=beta, retain_weight=2.0)
    # margins: (1 - 0.5) = 0.5 and (-1 - 2) = -3
    by_hand = -(_logsigmoid(beta * 0.5) + _logsigmoid(beta * -3.0)) / 2
    formula = -torch.nn.functional.logsigmoid(
        beta * ((chosen - ref_c) - (rejected - ref_r))).mean()
    assert objective.forget_loss(inputs).item() == pytest.approx(by_hand, rel=1e-12)
    assert objective.forget_loss(inputs).item() == pytest.approx(formula.item(), rel=1e-12)
    assert objective.loss(inputs).item() == pytest.approx(by_hand + 3.0, rel=1e-12)
    objective.forget_loss(inputs).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # up the chosen, down the other
    assert objective.needs == Needs(logprobs=True, reference_logprobs=True, alternative=True,
                                    reference_alternative=True, continuation=True,
                                    retain_loss=True)


def test_dpo_is_bounded_log2_at_zero_margin_and_vanishes_when_ranked_right():
    objective = get_objective("dpo", beta=0.1, retain_weight=0.0)

    def loss(margin: float) -> float:
        return objective.loss(ObjectiveInputs(
            logp=torch.tensor([-5.0]), n_tokens=torch.ones(1), ref_logp=torch.tensor([-5.0]),
            alt_logp=torch.tensor([-5.0 + margin]), alt_n_tokens=torch.ones(1),
            ref_alt_logp=torch.tensor([-5.0]))).item()

    assert loss(0.0) == pytest.approx(math.log(2))
    assert 0 < loss(500.0) < 1e-20 and loss(-500.0) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="ref_alt_logp"):
        objective.loss(ObjectiveInputs(logp=torch.tensor([-1.0]), n_tokens=torch.ones(1),
                                       ref_logp=torch.tensor([-1.0]),
                                       alt_logp=torch.tensor([-1.0]), alt_n_tokens=torch.ones(1)))


# --- rows and gradients on a tiny model -------------------------------------------------------

def test_collate_scores_only_tokens_from_start():
    with loaded(LLAMA) as lm:
        batch = collate(lm, [[1, 10, 11, 12, 13], [1, 20, 21]], starts=[3, 1])
    # row 0 (no padding): positions 2 and 3 predict tokens 3 and 4; row 1 (2 pads) predicts
    # its tokens 1 and 2 from positions 2 and 3
    assert batch.label_mask.tolist() == [[False, False, True, True, False],
                                         [False, False, True, True, False]]
    assert batch.labels[0, 2:4].tolist() == [12, 13] and batch.labels[1, 2:4].tolist() == [20, 21]


def test_redirect_gradient_touches_only_the_alternative_positions():
    with loaded(LLAMA) as lm:
        rows = build_rows(lm, HI[:3], EN[:3], get_objective("redirect").needs, 200, "hi")
        assert rows.forget_starts is None and rows.dropped == 0
        for ids, start, alt in zip(rows.alternative, rows.alternative_starts, EN[:3],
                                   strict=True):
            assert lm.tokenizer.decode(ids[start:]) == " " + alt  # whole alternative, no prompt
        batch = collate(lm, rows.alternative, rows.alternative_starts)
        with torch.no_grad():
            hidden = forward(lm, batch, hidden=True, layer=None).hidden
        hidden.requires_grad_(True)
        head = losses.head_params(unwrap(lm.model))
        logp, n = losses.sequence_logprobs(hidden, labels=batch.labels, mask=batch.label_mask,
                                           **head)
        assert n.tolist() == [len(r) - s for r, s in zip(rows.alternative,
                                                         rows.alternative_starts, strict=True)]
        get_objective("redirect").forget_loss(ObjectiveInputs(alt_logp=logp, alt_n_tokens=n)) \
            .backward()
    # the LM head acts per position: the gradient on a position's final state is the gradient
    # on its logits, mapped back; it is zero exactly where no alternative token is predicted
    touched = hidden.grad.abs().sum(-1) > 0
    assert touched.tolist() == batch.label_mask.tolist()


def test_dpo_rows_share_the_prompt_tokens():
    with loaded(LLAMA) as lm:
        rows = build_rows(lm, HI[:4], EN[:4], get_objective("dpo").needs, 200, "hi")
        for i in range(4):
            f, a = rows.forget[i], rows.alternative[i]
            fs, as_ = rows.forget_starts[i], rows.alternative_starts[i]
            assert fs == as_ and f[:fs] == a[:as_]
            words = HI[i].split()  # the rejected side is the text's second half of words
            assert lm.tokenizer.decode(f[fs:]) == " " + " ".join(words[round(len(words) / 2):])
            assert lm.tokenizer.decode(a[as_:]) == " " + EN[i]


# --- data, fallback and the CLI ---------------------------------------------------------------

def test_alternative_file_must_be_line_aligned(files):
    with pytest.raises(DataError, match=r"has 5 lines but --forget .* has 12"):
        read_aligned(str(files["hi"]), str(files["short"]), "text", None)
    forget, alt = read_aligned(str(files["hi"]), str(files["en"]), "text", 3)
    assert forget == HI[:3] and alt == EN[:3]


def test_alternative_refused_for_objectives_that_do_not_read_it(files):
    with pytest.raises(ValueError, match=r"\(dpo, redirect\), not 'npo'"):
        UnlearnConfig(forget=str(files["hi"]), retain=(str(files["en"]),), objective="npo",
                      alternative=str(files["en"]))


def test_fallback_is_the_first_retain_set_cycled_and_recorded(files):
    c = UnlearnConfig(forget=str(files["hi"]), retain=(str(files["short"]), str(files["en"])),
                      objective="redirect")
    data = read_data(c)
    want = [EN[i % 5] for i in range(12)]
    assert data.alternative.texts == want
    assert data.alternative.record == {"source": FALLBACK, "path": None, "n": 12,
                                       "sha256": texts_sha256(want)}
    given = choose(["x"], str(files["en"]), [["y"]], 1).record
    assert given["source"] == "file" and given["file_sha256"] == sha256_file(files["en"])
    assert read_data(UnlearnConfig(forget=str(files["hi"]), retain=(str(files["en"]),))) \
        .alternative is None  # npo reads none


@pytest.mark.parametrize("objective", ["redirect", "dpo"])
def test_cli_unlearn_with_alternative_writes_an_adapter(files, tmp_path, objective):
    from mmie.cli import app

    out = tmp_path / objective
    args = ["unlearn", "--model", "tiny:llama", "--device", "cpu", "--forget", str(files["hi"]),
            "--retain", str(files["en"]), "--alternative", str(files["en"]), "--objective",
            objective, "--steps", "2", "--batch-size", "2", "--max-length", "48",
            "--checkpoint-every", "0", "--out", str(out), "--json"]
    if objective == "redirect":
        args += ["--objective-opt", "base=npo", "--objective-opt", "redirect_weight=0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["objective"] == objective
    artifact = load(out, kind="adapter")
    record = artifact.config["alternative_inputs"]
    assert record["source"] == "file" and record["sha256"] == texts_sha256(EN)
    assert artifact.config["alternative"] == str(files["en"])
    curve = artifact.metrics["curve"]
    assert all("alternative_nll" in r for r in curve)
    if objective == "dpo":  # the references were computed on the very rows trained on
        assert curve[0]["forget"] == pytest.approx(math.log(2), abs=1e-5)


def test_cli_refuses_a_misaligned_alternative(files, tmp_path):
    from mmie.cli import app

    result = CliRunner().invoke(app, [
        "unlearn", "--model", "tiny:llama", "--device", "cpu", "--forget", str(files["hi"]),
        "--retain", str(files["en"]), "--alternative", str(files["short"]), "--objective",
        "redirect", "--steps", "1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "has 5 lines but --forget" in " ".join(result.output.split())
    assert "has 12" in " ".join(result.output.split())
