"""The reference-target cache (mmie.unlearn.refcache): computed once, reused bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmie.unlearn.data as unlearn_data
from mmie.core.models import ModelSpec, loaded
from mmie.edits.adapters import PEFT_WEIGHTS
from mmie.unlearn import refcache
from mmie.unlearn.stage import UnlearnConfig, run
from tests.conftest import EN, HI, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MMIE_CACHE", "1")
    monkeypatch.setenv("MMIE_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "cache" / "references"


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """Counts the reference passes (the training loop has its own binding of ``forward``)."""
    calls, original = [], unlearn_data.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(unlearn_data, "forward", counted)
    return calls


def _config(tmp_path: Path, **kw) -> UnlearnConfig:
    hi = write_jsonl(tmp_path / "hi.jsonl", HI[:6])
    en = write_jsonl(tmp_path / "en.jsonl", EN[:6])
    base = dict(forget=str(hi), retain=(str(en),), model=ModelSpec(name="tiny:llama",
                device="cpu"), method="lora", objective="npo", rank=4, steps=3, lr=1e-2,
                batch_size=2, max_length=16, checkpoint_every=0)
    return UnlearnConfig(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / PEFT_WEIGHTS)


def test_second_run_computes_nothing_and_is_bit_identical(tmp_path, cache_on, passes):
    c = _config(tmp_path)
    first = run(c, tmp_path / "a")
    computed = len(passes)
    assert computed > 0 and sorted(p.name.split("-")[0] for p in cache_on.iterdir()) == \
        ["forget", "retain_topk"]
    assert first.metrics["reference_cache"]["rows_loaded"] == 0
    second = run(c, tmp_path / "b")
    assert len(passes) == computed  # no reference pass the second time
    record = second.metrics["reference_cache"]
    assert record["rows_computed"] == 0 and record["rows_loaded"] > 0
    a, b = _weights(first.path), _weights(second.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another seed and arm visiting the same rows (3 steps x 2 = all 6) reuse them too
    run(_config(tmp_path, seed=3, method="reft"), tmp_path / "c")
    assert len(passes) == computed


@pytest.mark.parametrize("change", [dict(chunk_size=7), dict(batch_size=3),
                                    dict(retain_options=(("top_k", "5"),)),
                                    dict(max_length=12)])
def test_a_changed_setting_misses(tmp_path, cache_on, passes, change):
    run(_config(tmp_path), tmp_path / "a")
    before = len(passes)
    art = run(_config(tmp_path, **change), tmp_path / "b")
    assert len(passes) > before
    assert art.metrics["reference_cache"]["rows_computed"] > 0


def test_changed_data_misses_only_its_own_set(tmp_path, cache_on, passes):
    run(_config(tmp_path), tmp_path / "a")
    before = len(passes)
    other = write_jsonl(tmp_path / "hi2.jsonl", HI[6:12])
    art = run(_config(tmp_path, forget=str(other)), tmp_path / "b")
    assert len(passes) > before
    files = sorted(p.name.split("-")[0] for p in cache_on.iterdir())
    assert files == ["forget", "forget", "retain_topk"]  # the retain targets were reused
    assert art.metrics["reference_cache"]["rows_loaded"] > 0


def test_damaged_file_is_a_miss_and_off_writes_nothing(tmp_path, cache_on, passes,
                                                      monkeypatch):
    run(_config(tmp_path), tmp_path / "a")
    before = len(passes)
    for path in cache_on.iterdir():
        path.write_bytes(b"not safetensors")
    run(_config(tmp_path), tmp_path / "b")
    assert len(passes) > before
    assert all(load_file(p) for p in cache_on.iterdir())  # rewritten whole
    monkeypatch.setenv("MMIE_CACHE", "0")
    home = tmp_path / "home2"
    monkeypatch.setenv("MMIE_HOME", str(home))
    art = run(_config(tmp_path), tmp_path / "c")
    assert not (home / "cache").exists() and art.metrics["reference_cache"] == {"used": False}


def test_rmu_activations_and_curriculum_are_cached(tmp_path, cache_on, passes):
    c = _config(tmp_path, method="reft", objective="rmu", curriculum=True)
    first = run(c, tmp_path / "a")
    before = len(passes)
    second = run(c, tmp_path / "b")
    assert len(passes) == before
    a, b = first.tensors("reft"), second.tensors("reft")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {p.name.split("-")[0] for p in cache_on.iterdir()} >= {"forget", "retain_acts"}


def test_key_changes_with_rows_starts_and_settings():
    with loaded(ModelSpec(name="tiny:llama", device="cpu")) as lm:
        key = lambda *a: refcache.key(lm, *a)  # noqa: E731
        base = key("forget", [[1, 2, 3]], None, {"batch_size": 2})
        assert base == key("forget", [[1, 2, 3]], None, {"batch_size": 2})
        assert base != key("forget", [[1, 2, 4]], None, {"batch_size": 2})
        assert base != key("forget", [[1, 2], [3]], None, {"batch_size": 2})
        assert base != key("forget", [[1, 2, 3]], [1], {"batch_size": 2})
        assert base != key("forget", [[1, 2, 3]], None, {"batch_size": 3})
        assert base != key("retain_topk", [[1, 2, 3]], None, {"batch_size": 2})
    with loaded(ModelSpec(name="tiny:qwen2", device="cpu")) as other:
        assert base != refcache.key(other, "forget", [[1, 2, 3]], None, {"batch_size": 2})


def test_exact_kl_reads_the_cached_reference_summary(tmp_path, cache_on, passes, monkeypatch):
    """Exact KL through a linear head: the reference is summarised once (and cached); no step
    runs the reference model, and training matches the per-step reference forward's."""
    import mmie.core.kl_stats as kl_stats
    import mmie.unlearn.train as unlearn_train

    steps, real = [], unlearn_train.forward
    monkeypatch.setattr(unlearn_train, "forward",
                        lambda *a, **k: steps.append(1) or real(*a, **k))
    c = _config(tmp_path, retain_loss="kl", retain_options=(("exact", "true"),))
    first = run(c, tmp_path / "a")
    assert "retain_klstats" in {p.name.split("-")[0] for p in cache_on.iterdir()}
    assert len(steps) == 2 * c.steps  # forget and retain batches only
    computed = len(passes)
    second = run(c, tmp_path / "b")
    assert len(passes) == computed and second.metrics["reference_cache"]["rows_computed"] == 0
    a, b = _weights(first.path), _weights(second.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(kl_stats, "applies", lambda lm: False)  # as under a soft-capped head
    steps.clear()
    per_step = _weights(run(c, tmp_path / "c").path)
    assert len(steps) == 3 * c.steps  # a reference forward of the retain batch every step
    assert all(torch.allclose(a[k], per_step[k], rtol=1e-4, atol=1e-6) for k in a)
