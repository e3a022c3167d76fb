"""Test helpers shared by several test files: a Ctrl-C stand-in and a clean launcher env."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from mmie.core.progress import Progress, Task
from tests.conftest import REPO

LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class StopAfter(Progress):
    """Raises KeyboardInterrupt once ``n`` steps of a loop are done, leaving that step's
    checkpoint; only the loop named ``desc`` counts when one is given."""

    def __init__(self, n: int, desc: str | None = None) -> None:
        self.n, self.desc = n, desc

    @contextmanager
    def task(self, desc: str, total: int | None = None) -> Iterator[Task]:
        stop = self.n if self.desc in (None, desc) else None

        class Counter(Task):
            done = 0

            def advance(self, n: int = 1, **fields: object) -> None:
                self.done += n
                if stop is not None and self.done >= stop:
                    raise KeyboardInterrupt

        yield Counter()


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for a torchrun subprocess: no launcher variables inherited, one thread
    per process (2 processes on a 2-core machine, same kernels as 1), CPU only, this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", **extra)
    return env


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Import into a test module to run it on one torch thread: tiny models gain nothing from
    threads, and on a busy 2-core machine every OpenMP barrier costs milliseconds per op (and
    launched processes run with OMP_NUM_THREADS=1, so the kernels match)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def relearn_on(tmp_path, arm, texts):
    """`mmie relearn` for one step on tiny llama against the adapter at ``arm``; the attack and
    held-out sets are the first 6 and the rest of ``texts``. Returns the CLI result."""
    from typer.testing import CliRunner

    from mmie.cli import app
    from tests.conftest import write_jsonl

    write_jsonl(tmp_path / "attack.jsonl", texts[:6])
    write_jsonl(tmp_path / "held.jsonl", texts[6:])
    return CliRunner().invoke(app, [
        "relearn", "--attack", str(tmp_path / "attack.jsonl"), "--heldout",
        str(tmp_path / "held.jsonl"), "--model", "tiny:llama", "--device", "cpu", "--steps", "1",
        "--batch-size", "4", "--max-length", "32", "--n-boot", "100", "--forget-script", "Latn",
        "--adapter", str(arm), "--out", str(tmp_path / "r")])
