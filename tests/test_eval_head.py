"""`evaluate --head-dtype bf16`: the generation head (fast_head), the scoring passes and the CLI,
against fp32 on tiny models and a peaked hand-made head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mmie.cli import app
from mmie.core import head_precision as hp
from mmie.core.artifacts import load
from mmie.core.generation import GenerationSettings, ScoreItem, generate, score, text_items
from mmie.core.models import lm_head, unwrap
from mmie.lid.mass import mass_scores
from tests.conftest import EN, HI, write_jsonl
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ["hello there my good friend, how", "a", "नमस्ते दुनिया", "xyz", "the cat sat on the"]
# stated bounds of bf16 against fp32 on the tiny models (nats; z-scores are unitless)
LOGP_TOL, Z_TOL, MASS_TOL = 5e-3, 1e-2, 1e-3


def _peaked_head(vocab=512, d=64, seed=0) -> torch.nn.Linear:
    """A bias-free head whose rows put LM-like logits (max ~30) on a few ids."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=gen) * 0.25)
        head.weight[:24, :4] += 2.0
    head.requires_grad_(False)
    return head


def _hidden(n=2000, d=64, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    h[:, :4] *= 4
    return h


def test_fast_head_keeps_each_rows_top_logits_exact():
    head, h = _peaked_head(), _hidden(64).view(4, 16, 64)  # [batch, tokens, d], as HF calls it
    exact = F.linear(h, head.weight)
    with hp.head_precision("bf16"), hp.fast_head(head):
        got = head(h)
    assert got.shape == exact.shape and got.dtype == torch.float32
    top = exact.topk(hp.EXACT_TOP, dim=-1).indices
    # exact up to fp32 summation order (the einsum adds the 64 products in another order)
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), rtol=0, atol=2e-4)
    assert not torch.equal(got, exact)  # the rest is the bf16 product
    # bf16 rounds h, W (2^-9 each) and the product: bounded by the sum of |h_i W_vi|
    assert ((got - exact).abs() <= 2**-7 * (h.abs() @ head.weight.abs().T)).all()


def test_fast_head_argmax_is_fp32_where_plain_bf16_is_not():
    head, h = _peaked_head(), _hidden()
    exact = (h @ head.weight.T).argmax(-1)
    rough = (h.bfloat16() @ head.weight.bfloat16().T).float().argmax(-1)
    with hp.head_precision("bf16"), hp.fast_head(head):
        fast = head(h).argmax(-1)
    assert (rough != exact).sum() > 0  # near-ties that bf16 rounding alone gets wrong
    assert torch.equal(fast, exact)


def test_fast_head_is_restored_also_after_an_error():
    head, h = _peaked_head(), _hidden(8)
    before = head(h)
    with pytest.raises(RuntimeError, match="boom"), hp.head_precision("bf16"), \
            hp.fast_head(head):
        assert "forward" in vars(head)
        raise RuntimeError("boom")
    assert "forward" not in vars(head) and torch.equal(head(h), before)
    with hp.head_precision("bf16"), hp.fast_head(head):
        pass
    assert "forward" not in vars(head) and torch.equal(head(h), before)


def test_fast_head_leaves_other_heads_and_fp32_alone():
    biased = torch.nn.Linear(8, 16)
    wrapped = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False))
    plain = torch.nn.Linear(8, 16, bias=False)
    with hp.head_precision("fp32"), hp.fast_head(plain):
        assert "forward" not in vars(plain)
    with hp.head_precision("bf16"):
        for head in (biased, wrapped, torch.nn.Linear(8, 16, bias=False).double()):
            with hp.fast_head(head):
                assert "forward" not in vars(head)
    with hp.fast_head(plain):  # no precision asked for at all
        assert "forward" not in vars(plain)


def _count_fast_calls(monkeypatch) -> list:
    """Rows of every bf16 head product from now on (the shadowed head's, or the buffered one
    that greedy decoding and the scoring passes use)."""
    calls = []
    for name in ("fast_logits", "fast_logits_into"):
        real = getattr(hp, name)
        monkeypatch.setattr(hp, name, lambda h, *a, _real=real, **k:
                            calls.append(h.shape[0]) or _real(h, *a, **k))
    real_top = hp.LogitBuffer.top  # greedy decoding's top candidates, without the full row

    def top(self, h):
        got = real_top(self, h)
        if got is not None:
            calls.append(h.shape[0])
        return got

    monkeypatch.setattr(hp.LogitBuffer, "top", top)
    return calls


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_generation_under_bf16_is_the_fp32_one(tiny_lm, penalty, monkeypatch):
    settings = GenerationSettings(max_new_tokens=12, batch_size=2, repetition_penalty=penalty)
    head = lm_head(tiny_lm.model)
    weight = head.weight.detach().clone()
    exact = generate(tiny_lm, PROMPTS, settings)
    calls = _count_fast_calls(monkeypatch)
    with hp.head_precision("bf16"):
        fast = generate(tiny_lm, PROMPTS, settings)
    assert calls  # the bf16 head did compute the logits
    assert [g.new_ids for g in fast] == [g.new_ids for g in exact]
    assert "forward" not in vars(head)
    assert head.weight.dtype == torch.float32 and torch.equal(head.weight, weight)


def test_tied_gemma3_head_with_a_softcap(monkeypatch):
    from mmie.core.models import ModelSpec, loaded

    settings = GenerationSettings(max_new_tokens=12, batch_size=5, repetition_penalty=1.2)
    with loaded(ModelSpec(name="tiny:gemma3", device="cpu")) as lm:
        base = unwrap(lm.model)
        assert base.get_input_embeddings().weight is lm_head(lm.model).weight  # tied
        base.config.final_logit_softcapping = 0.5  # applied after the head: must still hold
        exact = generate(lm, PROMPTS, settings)
        calls = _count_fast_calls(monkeypatch)
        with hp.head_precision("bf16"):
            fast = generate(lm, PROMPTS, settings)
        # one call per step, one row per prompt: the last position only
        assert calls == [len(PROMPTS)] * settings.max_new_tokens
        assert base.get_input_embeddings().weight is lm_head(lm.model).weight
        assert lm_head(lm.model).weight.dtype == torch.float32
    assert [g.new_ids for g in fast] == [g.new_ids for g in exact]


def test_scoring_passes_under_bf16_stay_within_the_stated_bounds(tiny_lm):
    items = text_items(tiny_lm, EN[:3] + HI[:3], 64)
    vocab = lm_head(tiny_lm.model).out_features
    sets = [list(range(0, vocab, 2)), list(range(1, vocab, 2))]
    conts = [ScoreItem(it.ids, len(it.ids) // 2) for it in items]
    got = {}
    for name in ("fp32", "bf16"):
        with hp.head_precision(name):
            got[name] = (score(tiny_lm, items, batch_size=4), score(tiny_lm, items, z=False),
                         mass_scores(tiny_lm, conts, sets, batch_size=4))
    (full, logp, mass), (full16, logp16, mass16) = got["fp32"], got["bf16"]
    lp = lambda scores: torch.tensor([x for s in scores for x in s.logprobs])  # noqa: E731
    zs = lambda scores: torch.tensor([x for s in scores for x in s.z_scores])  # noqa: E731
    assert (lp(full16) - lp(full)).abs().max() < LOGP_TOL
    assert (lp(logp16) - lp(logp)).abs().max() < LOGP_TOL
    assert (zs(full16) - zs(full)).abs().max() < Z_TOL
    assert not torch.equal(lp(logp16), lp(logp))  # the bf16 product was used
    for a, b in zip(mass, mass16, strict=True):
        assert b.mass == pytest.approx(a.mass, abs=MASS_TOL)
    assert lp(score(tiny_lm, items, z=False)).equal(lp(logp))  # fp32: bit for bit as before


def test_evaluate_records_the_head_dtype_and_rejects_others(tmp_path):
    hi, en = write_jsonl(tmp_path / "hi.jsonl", HI[:3]), write_jsonl(tmp_path / "en.jsonl", EN[:3])
    args = ["evaluate", "--model", "tiny:llama", "--forget", str(hi), "--retain", str(en),
            "--n-prompts", "3", "--max-new-tokens", "4"]
    runner = CliRunner()
    samples = {}
    for name in ("fp32", "bf16"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name), "--head-dtype", name])
        assert result.exit_code == 0, result.output
        art = load(tmp_path / name, kind="eval")
        assert art.config["head_dtype"] == name
        samples[name] = [r["generation"] for r in art.read_jsonl("samples.jsonl")]
    assert samples["bf16"] == samples["fp32"]
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--head-dtype", "fp16"])
    assert bad.exit_code == 2 and "head dtype" in bad.output
