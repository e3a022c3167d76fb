"""`evaluate` sharded across processes: 2 processes write exactly the 1-process artifact.

The launched test runs real `torchrun` workers (gloo on CPU) on tiny:llama; the in-process
tests simulate ranks by collecting each rank's share where the gather would happen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmie.core import sharded
from mmie.core.artifacts import save
from mmie.core.distributed import World
from mmie.core.generation import GenerationSettings, generate, score, text_items
from mmie.core.models import ModelSpec, loaded
from mmie.core.progress import SILENT
from mmie.core.sharded import length_batches, map_batches, merge_shares, run_share
from mmie.evaluate.config import EvalConfig
from mmie.evaluate.passes import pooled_states

from .conftest import EN, HI, write_jsonl
from .helpers import launch_env

UR = ["میں آج بازار جا رہا ہوں", "یہ کتاب بہت اچھی ہے", "بارش کے بعد موسم ٹھنڈا ہو گیا",
      "ہمارے گاؤں میں ایک پرانا مندر ہے", "بچے میدان میں کرکٹ کھیل رہے ہیں"]
TINY = ModelSpec(name="tiny:llama", device="cpu")
WALL_CLOCK = ("created_at",)


# --- the batch-level shard / merge helpers ------------------------------------------------------

def test_length_batches_sort_by_length_and_keep_ties_in_order():
    assert length_batches([3, 1, 2, 1, 5, 1, 2], 3) == [[1, 3, 5], [2, 6, 0], [4]]
    assert length_batches([], 4) == []


def test_seven_batches_over_three_ranks_merge_back_in_order():
    lengths = [5, 2, 9, 2, 7, 1, 4, 4, 8, 3, 6, 2, 5, 1, 9, 3, 7, 2, 6]     # 19 items
    plan = length_batches(lengths, 3)
    assert len(plan) == 7
    seen = []

    def fn(number, chunk):
        seen.append(number)
        return [f"item{i}/batch{number}" for i in chunk]

    shares = [run_share(plan, fn, World(r, 3, r)) for r in range(3)]
    assert sorted(seen) == list(range(7)) and len(seen) == 7      # every batch run once
    assert [sorted({v.split("batch")[1] for v in s.values()}, key=int) for s in shares] == \
        [["0", "3", "6"], ["1", "4"], ["2", "5"]]                 # whole batches, round-robin
    merged = merge_shares(shares, len(lengths))
    assert [v.split("/")[0] for v in merged] == [f"item{i}" for i in range(19)]
    assert merged == map_batches(plan, fn, len(lengths))         # = the one-process result


def test_merge_refuses_missing_or_twice_computed_items():
    with pytest.raises(ValueError, match="no result"):
        merge_shares([{0: "a"}, {2: "c"}], 3)
    with pytest.raises(ValueError, match="two processes"):
        merge_shares([{0: "a", 1: "b"}, {1: "b"}], 2)


def test_a_world_without_a_process_group_is_refused():
    with pytest.raises(RuntimeError, match="ensure_group"):
        map_batches([[0], [1]], lambda n, chunk: chunk, 2, here=World(0, 2, 0))


# --- passes run rank by rank in one process ---------------------------------------------------

class _Gathered(Exception):
    """Raised where a rank would wait for the others: its share is recorded by then."""


def _as_ranks(monkeypatch, call, size: int, n: int) -> list:
    """Run ``call(here)`` as each of ``size`` ranks and merge their shares like the gather."""
    shares = []

    def fake_gather(obj):
        shares.append(obj)
        raise _Gathered

    monkeypatch.setattr(sharded, "gather", fake_gather)
    for rank in range(size):
        with pytest.raises(_Gathered):
            call(World(rank, size, rank))
    return merge_shares(shares, n)


@pytest.fixture(scope="module")
def llama():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with loaded(TINY) as lm:
        yield lm
    torch.set_num_threads(before)


@pytest.mark.parametrize("settings", [
    GenerationSettings(max_new_tokens=6, batch_size=2, repetition_penalty=1.2,
                       record_logprobs=True),
    GenerationSettings(max_new_tokens=6, batch_size=2, temperature=1.3, top_p=0.9, seed=4),
], ids=["greedy", "sampled"])
def test_generation_is_the_same_on_any_number_of_ranks(llama, monkeypatch, settings):
    prompts = HI[:5] + EN[:4]
    one = generate(llama, prompts, settings)
    for size in (2, 3):
        many = _as_ranks(monkeypatch, lambda here: generate(llama, prompts, settings, here=here),
                         size, len(prompts))
        assert many == one


def test_scores_and_probe_states_are_the_same_on_any_number_of_ranks(llama, monkeypatch,
                                                                     tmp_path):
    texts = HI[:7]
    items = text_items(llama, texts, 64)
    one = score(llama, items, batch_size=3)
    two = _as_ranks(monkeypatch, lambda here: score(llama, items, batch_size=3, here=here), 2,
                    len(texts))
    assert two == one
    config = EvalConfig(model=TINY, forget="f", retain="r", batch_size=3, max_length=64)
    pooled = pooled_states(llama, texts, [1, 2], config, World(), SILENT, "probe")
    rows = _as_ranks(monkeypatch, lambda here: pooled_states(
        llama, texts, [1, 2], config, here, SILENT, "probe"), 2, len(texts))
    # the simulated gather sees per-text rows; stacked they are the one-process states
    for layer in (1, 2):
        assert torch.equal(torch.stack([r[layer] for r in rows]), pooled[layer])


# --- launched: torchrun, 2 processes vs 1 -----------------------------------------------------

def _comparable(out: Path) -> dict[str, object]:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for key in WALL_CLOCK:
        manifest.pop(key)
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}
    return {"manifest": manifest, **files}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    data = {"hi.jsonl": HI[:7], "en.jsonl": EN[:7], "ur.jsonl": UR, "train.jsonl": HI[3:10]}
    for name, texts in data.items():
        write_jsonl(root / name, texts)
    with loaded(TINY) as lm:
        save(root / "layers", "layers", tensors={}, config={}, model=lm.identity,
             metrics={"chosen": [1, 2]})
    # 7 prompts at batch 3: 3 batches, unequal shares (2 and 1) and a short last batch
    args = ["-m", "mmie", "evaluate", "--model", "tiny:llama", "--forget", "hi.jsonl",
            "--retain", "en.jsonl", "--xlang", "ur=ur.jsonl", "--forget-train", "train.jsonl",
            "--layers", "layers", "--n-prompts", "7", "--batch-size", "3",
            "--max-new-tokens", "5", "--json"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "--log-dir", "logs", "--redirects", "3"]
    runs = [subprocess.Popen([sys.executable, *args, "--out", "one"], cwd=root,
                             env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE),
            subprocess.Popen([*torchrun, *args, "--out", "two"], cwd=root, env=launch_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    try:
        for proc in runs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        for proc in runs:
            proc.kill()  # a no-op for a process that has exited
    return root


def test_two_processes_write_the_one_process_artifact(launched):
    one, two = _comparable(launched / "one"), _comparable(launched / "two")
    files = ("samples.jsonl", "ppl.jsonl", "mia.jsonl", "mass.jsonl", "token_sets.json",
             "rates.png")
    assert set(two) == {"manifest", *files}
    assert two["manifest"] == one["manifest"]
    for name in files:
        assert two[name] == one[name], name
    samples = [json.loads(line) for line in two["samples.jsonl"].decode().splitlines()]
    assert len(samples) == 7 + 7 + 5                     # forget, retain, xlang:ur
    assert "probe_auc" in two["manifest"]["metrics"]


def test_only_rank_0_writes_and_speaks(launched):
    written = sorted(p.name for p in launched.iterdir() if p.is_dir())
    assert written == ["layers", "logs", "one", "two"]   # one artifact per run, nothing else
    (attempt,) = launched.glob("logs/*/attempt_0")
    assert (attempt / "1" / "stdout.log").read_text() == ""
    assert (attempt / "1" / "stderr.log").read_text() == ""
    payload = json.loads((attempt / "0" / "stdout.log").read_text())
    assert Path(payload["artifact"]) == Path("two") and payload["arm"] == "base"
