"""mmie's greedy loop (mmie.core.decode) against transformers' generate, and the logit buffer."""

from dataclasses import replace

import pytest
import torch

from mmie.core import decode
from mmie.core import head_precision as hp
from mmie.core.generation import GenerationSettings, generate
from mmie.core.models import ModelSpec, lm_head, loaded, unwrap
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ["hello there my good friend, how", "a", "नमस्ते दुनिया", "xyz", "the cat sat on the",
           "the the the the"]


def _both(lm, settings):
    ours = generate(lm, PROMPTS, settings)
    theirs = generate(lm, PROMPTS, replace(settings, engine="transformers"))
    return ours, theirs


def _spy(monkeypatch) -> list:
    calls, real = [], decode.greedy
    monkeypatch.setattr(decode, "greedy", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_loop_gives_generates_tokens(tiny_lm, precision, penalty, monkeypatch):
    settings = GenerationSettings(max_new_tokens=10, batch_size=4, repetition_penalty=penalty)
    calls = _spy(monkeypatch)
    with hp.head_precision(precision):
        ours, theirs = _both(tiny_lm, settings)
    assert len(calls) == 2  # two batches of 4 and 2 went through the loop, once each
    assert [g.new_ids for g in ours] == [g.new_ids for g in theirs]
    assert [g.text for g in ours] == [g.text for g in theirs]


def test_softcapped_tied_head_gives_generates_tokens():
    settings = GenerationSettings(max_new_tokens=10, batch_size=3, repetition_penalty=1.2)
    with loaded(ModelSpec(name="tiny:gemma3", device="cpu")) as lm:
        unwrap(lm.model).config.final_logit_softcapping = 0.5  # squashes every logit hard
        for precision in ("fp32", "bf16"):
            with hp.head_precision(precision):
                ours, theirs = _both(lm, settings)
            assert [g.new_ids for g in ours] == [g.new_ids for g in theirs]


def test_stop_tokens_end_rows_as_generate_does(tiny_lm):
    free = generate(tiny_lm, PROMPTS, GenerationSettings(max_new_tokens=8))
    stop = free[0].new_ids[2]
    tiny_lm.model.generation_config.eos_token_id = [stop]
    ours, theirs = _both(tiny_lm, GenerationSettings(max_new_tokens=8, record_logprobs=True))
    assert [(g.new_ids, g.finished) for g in ours] == [(g.new_ids, g.finished) for g in theirs]
    assert ours[0].finished and ours[0].n_tokens == free[0].new_ids.index(stop)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.logprobs) == a.n_tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_sampling_and_forced_engine_keep_generate(tiny_lm, monkeypatch):
    calls = _spy(monkeypatch)
    generate(tiny_lm, PROMPTS, GenerationSettings(max_new_tokens=3, temperature=1.0))
    generate(tiny_lm, PROMPTS, GenerationSettings(max_new_tokens=3, engine="transformers"))
    generate(tiny_lm, PROMPTS, GenerationSettings(max_new_tokens=3, static_cache=True))
    assert calls == []
    with pytest.raises(ValueError, match="engine"):
        GenerationSettings(engine="vllm")


def test_a_head_with_its_own_forward_keeps_generate(tiny_lm, monkeypatch):
    head = lm_head(tiny_lm.model)
    head.forward = lambda h: torch.nn.functional.linear(h, head.weight)
    try:
        assert not decode.usable(tiny_lm)
    finally:
        del head.forward
    assert decode.usable(tiny_lm)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logit_buffer_equals_head_logits_and_is_reused(tiny_lm, precision):
    head = lm_head(tiny_lm.model)
    h = torch.randn(7, head.in_features)
    also = torch.randint(0, head.out_features, (7, 1))
    buffer = hp.LogitBuffer(head, softcap=2.0)
    with torch.inference_mode(), hp.head_precision(precision):
        want = hp.head_logits(head, h, also)
        want = 2.0 * torch.tanh(want / 2.0)
        first = buffer(h, also).clone()
        second = buffer(h[:3], also[:3])
        storage = second.untyped_storage().data_ptr()
        third = buffer(h[:5], also[:5])
    assert torch.equal(first, want) and torch.equal(second, want[:3])
    assert third.untyped_storage().data_ptr() == storage  # one buffer for every call


def _peaked_head(vocab=3000, d=32, seed=0) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
    head.weight.copy_(torch.randn(vocab, d, generator=gen))
    head.weight[:40] *= 3  # a few ids with LM-like logits around 20-30
    return head


@pytest.mark.parametrize("penalty", [1.0, 1.2, 3.0])
def test_the_pick_from_top_candidates_is_the_full_rows_pick(penalty, monkeypatch):
    head = _peaked_head()
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(64, head.in_features, generator=gen)
    top = (h @ head.weight.T).topk(40, dim=-1).indices
    # texts that already hold many of each row's best ids: the penalty moves the pick around,
    # and some rows' 32 candidates all drop below the bound
    text = torch.cat([top[:, :2], top[:, :40] * (torch.arange(64)[:, None] % 3 == 0)], 1)
    fulls = []
    real_full = decode._full
    monkeypatch.setattr(decode, "_full", lambda lo, hh, *a: fulls.append(len(hh)) or
                        real_full(lo, hh, *a))
    with torch.inference_mode(), hp.head_precision("bf16"):
        buffer = hp.LogitBuffer(head)
        want = real_full(buffer, h, text, penalty)
        got = decode._choose(buffer, h, text, penalty)
        assert torch.equal(got, want)
        decided_here, fulls[:] = 64 - sum(fulls), []
        real_top = buffer.top  # nothing certain: every row falls back
        monkeypatch.setattr(buffer, "top", lambda hh: (*real_top(hh)[:2], torch.full(
            (len(hh),), float("inf"))))
        assert torch.equal(decode._choose(buffer, h, text, penalty), want)
    assert decided_here > 32  # most rows never wrote their fp32 row
    assert fulls == [64]  # and the forced case really fell back, once, for every row


def test_the_pick_needs_a_reduced_plain_head():
    head = _peaked_head()
    h = torch.randn(4, head.in_features)
    with torch.inference_mode():
        assert hp.LogitBuffer(head).top(h) is None  # fp32: the full row is the product
        with hp.head_precision("bf16"):
            assert hp.LogitBuffer(head, softcap=30.0).top(h) is None
            ids, exact, bound = hp.LogitBuffer(head).top(h)
    assert ids.shape == exact.shape == (4, 2 * hp.EXACT_TOP) and bound.shape == (4,)
    torch.testing.assert_close(exact, torch.gather(h @ head.weight.T, 1, ids))


def test_topk_picks_the_same_ids_from_bf16_and_its_fp32_upcast():
    """What _choose relies on: its candidates (topk of the bf16 product) are the ids _full makes
    exact (topk of the fp32 upcast), even where many logits tie at the 32nd value."""
    gen = torch.Generator().manual_seed(0)
    low = (torch.randn(64, 20000, generator=gen) * 8).bfloat16()
    k = 2 * hp.EXACT_TOP
    ties = (low == low.topk(k, dim=-1).values[:, -1:]).sum(-1) > 1
    assert ties.sum() > 10  # the case that matters is there
    assert torch.equal(low.topk(k, dim=-1).indices, low.float().topk(k, dim=-1).indices)
