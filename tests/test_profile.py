"""Phase timing (mmie.core.profile), thread settings (mmie.core.threads) and their CLI hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmie.core import profile, threads
from mmie.core.artifacts import load, save


@pytest.fixture
def profiling(monkeypatch):
    monkeypatch.setenv(profile.ENV, "1")
    profile.reset()
    yield
    profile.reset()


def test_off_records_nothing(monkeypatch):
    monkeypatch.delenv(profile.ENV, raising=False)
    profile.reset()
    with profile.phase("a"):
        pass
    assert profile.snapshot() is None and profile.since_mark() is None


def test_nested_phases_counted_and_marked(profiling):
    for _ in range(2):
        with profile.phase("outer"), profile.phase("inner"):
            pass

    @profile.phase("deco")
    def f():
        with profile.phase("leaf"):
            return 3

    assert f() == 3
    table = profile.since_mark()
    assert list(table["phases"]) == ["deco", "deco/leaf", "outer", "outer/inner"]
    assert table["phases"]["outer"]["calls"] == 2
    assert table["phases"]["outer"]["seconds"] >= table["phases"]["outer/inner"]["seconds"]
    with profile.phase("later"):
        pass
    assert list(profile.since_mark()["phases"]) == ["later"]  # only what came since the mark
    assert len(profile.snapshot()["phases"]) == 5
    text = profile.render(profile.snapshot())
    assert "  inner" in text and "threads=" in text


def test_save_stores_the_profile_only_when_on(profiling, tmp_path, monkeypatch):
    with profile.phase("work"):
        pass
    art = save(tmp_path / "a", "report", tensors={}, config={}, model=None)
    assert set(load(art.path).metrics["profile"]["phases"]) == {"work"}
    monkeypatch.setenv(profile.ENV, "0")
    art = save(tmp_path / "b", "report", tensors={}, config={}, model=None)
    assert "profile" not in load(art.path).metrics


def test_cli_profile_flag_prints_a_table(text_files, monkeypatch):
    from mmie.cli import app

    monkeypatch.setenv(profile.ENV, "0")  # restored (unset) after the test; --profile sets it
    profile.reset()
    result = CliRunner().invoke(app, ["--profile", "data", "check", str(text_files["hi"])])
    profile.reset()
    assert result.exit_code == 0, result.output
    assert "profile" in result.output and "wall (since start)" in result.output


def test_threads_respect_explicit_env(monkeypatch):
    monkeypatch.setenv("MMIE_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.configure() == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv("MMIE_THREADS")
    assert threads.wanted() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        threads.wanted()


def test_threads_default_counts_physical_cores(monkeypatch, tmp_path: Path):
    for name in threads.ENV:
        monkeypatch.delenv(name, raising=False)
    for cpu, core in enumerate([0, 0, 1, 1]):  # two cores with two hyperthreads each
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert threads.physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert threads.physical_cores({0, 1}, tmp_path) == 1
    assert threads.physical_cores({7}, tmp_path) == 1  # unknown topology: one per CPU
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert threads.quota_cpus(quota) == 2
    quota.write_text("max 100000\n")
    assert threads.quota_cpus(quota) is None
    assert 1 <= threads.wanted() <= len(threads._allowed_cpus())
    assert threads.idle_cores(2, 0.2) == 2 and threads.idle_cores(2, 0.7) == 1
    assert threads.idle_cores(2, 3.5) == 1 and threads.idle_cores(8, 2.0) == 6
    assert threads.wanted(load=100.0) == 1


def test_threads_count_tasks_running_now_not_the_minute_average(monkeypatch, tmp_path: Path):
    # /proc/loadavg's fourth field counts the reader itself: "3/94" means two others.
    assert threads.running_others("1.90 1.33 1.39 3/94 23823\n") == 2
    assert threads.running_others("1.90 1.33 1.39 1/94 23823\n") == 0
    fake = tmp_path / "loadavg"
    fake.write_text("1.95 1.80 1.70 1/120 999\n")  # a busy minute behind, idle now
    monkeypatch.setattr(threads, "_PROC_LOADAVG", fake)
    assert threads._load(samples=3, pause=0.0) == 0.0
    fake.write_text("0.10 0.10 0.10 4/120 999\n")
    assert threads._load(samples=3, pause=0.0) == 3.0
