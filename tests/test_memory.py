"""mmie.core.memory: the allocator setting is applied where glibc has mallopt, opt-out works."""

import ctypes.util

import pytest

from mmie.core import memory


def test_system_setting_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(memory.ENV, "system")
    assert memory.keep_freed_memory() is False


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to load")
def test_glibc_takes_the_setting(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        pytest.skip("this C library has no mallopt")
    assert memory.keep_freed_memory() is True


def test_cli_start_applies_it(monkeypatch):
    from typer.testing import CliRunner

    from mmie.cli import app

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, ["model", "--help"])
    assert result.exit_code == 0 and calls == [1]
