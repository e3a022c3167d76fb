"""Batched generation and teacher-forced scoring on tiny random models."""

import math
from dataclasses import replace

import pytest
import torch

from mmie.core.generation import (
    GenerationSettings,
    ScoreItem,
    continuation_items,
    encode_prompts,
    generate,
    score,
    text_items,
)
from mmie.core.models import ModelSpec, loaded
from tests.helpers import one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ["hello there my good friend, how", "a", "नमस्ते दुनिया", "xyz", "the cat sat on the"]




@pytest.fixture
def llama():
    with loaded(ModelSpec(name="tiny:llama", device="cpu")) as lm:
        yield lm


def _texts(gens):
    return [g.text for g in gens]


def test_greedy_batched_equals_one_at_a_time(tiny_lm):
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    batched = generate(tiny_lm, PROMPTS, settings)
    single = [generate(tiny_lm, [p], settings)[0] for p in PROMPTS]
    assert [g.new_ids for g in batched] == [g.new_ids for g in single]
    assert _texts(batched) == _texts(single)
    assert all(g.n_tokens == 6 and not g.finished for g in batched)


def test_results_come_back_in_input_order(llama):
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)
    forward = generate(llama, PROMPTS, settings)
    backward = generate(llama, PROMPTS[::-1], settings)
    assert _texts(forward) == _texts(backward)[::-1]
    assert [list(g.prompt_ids) for g in forward] == encode_prompts(llama, PROMPTS, 256)


def test_checkpoint_sampling_config_is_ignored_for_greedy(llama):
    settings = GenerationSettings(max_new_tokens=6)
    clean = generate(llama, PROMPTS, settings)
    config = llama.model.generation_config
    config.do_sample, config.top_k, config.temperature = True, 5, 2.0  # Gemma-style defaults
    assert _texts(generate(llama, PROMPTS, settings)) == _texts(clean)


def test_stops_at_eos_per_row(llama):
    settings = GenerationSettings(max_new_tokens=8)
    free = generate(llama, PROMPTS, settings)
    stop = free[0].new_ids[2]                       # pretend this token is EOS
    llama.model.generation_config.eos_token_id = [stop]
    stopped = generate(llama, PROMPTS, settings)
    first = stopped[0]
    assert first.finished and first.new_ids == free[0].new_ids[:free[0].new_ids.index(stop)]
    for before, after in zip(free, stopped, strict=True):
        cut = before.new_ids.index(stop) if stop in before.new_ids else None
        assert after.new_ids == before.new_ids[:cut]
        assert after.finished == (cut is not None)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(llama):
    settings = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(llama, PROMPTS, settings)
    assert torch.equal(torch.get_rng_state(), state)
    assert _texts(generate(llama, PROMPTS, settings)) == _texts(first)
    greedy = generate(llama, PROMPTS, GenerationSettings(max_new_tokens=8))
    assert _texts(first) != _texts(greedy)


def test_long_prompt_keeps_bos_and_its_end(llama):
    ids = encode_prompts(llama, ["abcdefghij"], max_tokens=4)[0]
    full = llama.tokenizer("abcdefghij")["input_ids"]
    assert ids == [full[0], *full[-3:]] and full[0] == llama.tokenizer.bos_token_id


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                    dict(top_p=0.9), dict(compile=True, static_cache=False),
                                    dict(temperature=0.5, record_logprobs=True),
                                    dict(repetition_penalty=0.0)])
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        GenerationSettings(**kwargs)


def _reference_logprobs(lm, ids):
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)[:-1]
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], logp


def test_nll_matches_full_logits_and_ppl_is_exp_mean(llama):
    text = "the quick brown fox"
    item = text_items(llama, [text], 64)[0]
    got = score(llama, [item])[0]
    ref, logp = _reference_logprobs(llama, list(item.ids))
    assert got.n_tokens == len(item.ids) - 1
    assert got.nll_sum == pytest.approx(-ref.sum().item(), rel=1e-5)
    assert math.exp(got.mean_nll) == pytest.approx(math.exp(-ref.mean().item()), rel=1e-5)
    probs = logp.exp()
    mu = (probs * logp).sum(-1)
    sigma = ((probs * (logp - mu[:, None]) ** 2).sum(-1)).sqrt()
    assert list(got.z_scores) == pytest.approx(((ref - mu) / sigma).tolist(), rel=1e-4)


def test_scores_are_padding_invariant(tiny_lm):
    short, long = text_items(tiny_lm, ["a short one", "a much longer text " * 4], 128)
    alone = score(tiny_lm, [short])[0]
    together = score(tiny_lm, [long, short], batch_size=2)[1]
    assert together.n_tokens == alone.n_tokens
    assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_continuation_scores_only_new_tokens(llama):
    gens = generate(llama, ["hello there"], GenerationSettings(max_new_tokens=5))
    item = continuation_items(gens)[0]
    got = score(llama, [item])[0]
    whole = score(llama, [ScoreItem(item.ids, 1)])[0]
    assert got.n_tokens == 5
    assert got.logprobs == pytest.approx(whole.logprobs[-5:], abs=1e-5)


def test_empty_continuation_has_no_scored_tokens(llama):
    got = score(llama, [ScoreItem((1, 70, 71), start=3)])[0]
    assert got.n_tokens == 0 and got.mean_nll is None


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_recorded_logprobs_are_the_raw_model_scores(tiny_lm, penalty):
    settings = GenerationSettings(max_new_tokens=5, batch_size=2, repetition_penalty=penalty)
    plain = generate(tiny_lm, PROMPTS, settings)
    gens = generate(tiny_lm, PROMPTS, replace(settings, record_logprobs=True))
    assert [g.new_ids for g in gens] == [g.new_ids for g in plain]  # recording changes nothing
    forced = score(tiny_lm, continuation_items(gens), batch_size=2)
    for gen, ref in zip(gens, forced, strict=True):
        assert len(gen.logprobs) == gen.n_tokens == ref.n_tokens
        assert gen.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def test_repetition_penalty_changes_greedy_output(llama):
    texts = [_texts(generate(llama, PROMPTS, GenerationSettings(max_new_tokens=12,
                                                                repetition_penalty=p)))
             for p in (1.0, 3.0)]
    assert texts[0] != texts[1]


def test_recorded_logprobs_stop_with_the_text(llama):
    free = generate(llama, PROMPTS, GenerationSettings(max_new_tokens=8))
    llama.model.generation_config.eos_token_id = [free[0].new_ids[2]]
    got = generate(llama, PROMPTS, GenerationSettings(max_new_tokens=8, record_logprobs=True))
    assert all(len(g.logprobs) == g.n_tokens for g in got) and got[0].n_tokens == 2
    assert generate(llama, PROMPTS[:1], GenerationSettings(max_new_tokens=2))[0].logprobs is None


def test_static_cache_path_matches_dynamic(tiny_lm):
    # 5 prompts at batch 3: the static path pads the last batch to full size
    dynamic = generate(tiny_lm, PROMPTS, GenerationSettings(max_new_tokens=5, batch_size=3))
    static = generate(tiny_lm, PROMPTS, GenerationSettings(max_new_tokens=5, batch_size=3,
                                                          static_cache=True))
    assert [g.new_ids for g in static] == [g.new_ids for g in dynamic]
