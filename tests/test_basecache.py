"""evaluate's base-model fluency pass cached (mmie.evaluate.basecache): reused bit for bit."""

from __future__ import annotations

import pytest
import torch

from mmie.core.generation import TokenScores
from mmie.core.models import ModelSpec
from mmie.evaluate import basecache
from mmie.evaluate import passes as eval_pass
from mmie.evaluate.stage import EvalConfig, run
from tests.conftest import EN, HI, write_jsonl


@pytest.fixture
def counted(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setenv("MMIE_CACHE", "1")
    monkeypatch.setenv("MMIE_HOME", str(tmp_path / "home"))
    calls, original = [], eval_pass.score

    def score(*args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        return original(*args, **kwargs)

    monkeypatch.setattr(eval_pass, "score", score)
    return calls


def _config(tmp_path, **kw) -> EvalConfig:
    hi, en = write_jsonl(tmp_path / "hi.jsonl", HI[:6]), write_jsonl(tmp_path / "en.jsonl", EN[:6])
    base = dict(model=ModelSpec(name="tiny:llama", device="cpu"), forget=str(hi),
                retain=str(en), n_prompts=3, max_new_tokens=4, batch_size=4)
    return EvalConfig(**(base | kw))


def test_second_evaluation_reads_the_fluency_pass_back(tmp_path, counted):
    first = run(_config(tmp_path), tmp_path / "a")
    fluency = [d for d in counted if d.startswith("fluency")]
    assert sorted(fluency) == ["fluency forget", "fluency retain"]
    counted.clear()
    second = run(_config(tmp_path), tmp_path / "b")
    assert not [d for d in counted if d.startswith("fluency")] and counted  # the rest ran
    assert first.read_text("samples.jsonl") == second.read_text("samples.jsonl")
    assert (tmp_path / "home" / "cache" / "fluency").is_dir()
    counted.clear()
    run(_config(tmp_path, batch_size=2), tmp_path / "c")  # another setting: computed again
    assert len([d for d in counted if d.startswith("fluency")]) == 2


def test_encode_decode_round_trip_and_refusals():
    scores = [TokenScores((-1.25, -0.5), (0.1, 0.2)), TokenScores((), ()),
              TokenScores((-3.0,), (1.0,))]
    tensors = basecache._encode(scores)
    assert basecache._decode(tensors, 3) == scores
    assert basecache._decode(tensors, 2) is None  # another number of items
    assert basecache._decode({**tensors, "counts": torch.tensor([2, 2, 2])}, 3) is None
    assert basecache._decode({}, 3) is None


def test_score_without_z_gives_the_same_logprobs():
    from mmie.core.generation import score, text_items
    from mmie.core.models import loaded

    with loaded(ModelSpec(name="tiny:gemma3", device="cpu")) as lm:
        items = text_items(lm, HI[:4] + EN[:4], 24)
        full = score(lm, items, batch_size=3, chunk_tokens=5)
        fast = score(lm, items, batch_size=3, chunk_tokens=5, z=False)
    for a, b in zip(full, fast, strict=True):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
        assert len(b.z_scores) == len(a.z_scores) and all(z != z for z in b.z_scores)  # NaN
