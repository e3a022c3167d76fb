"""Where a command's time goes: named, nested phases timed by a context manager.

Off unless ``MMIE_PROFILE=1`` (or ``mmie --profile``, which sets it): then every
``with phase("name"):`` adds its wall time to a process-wide table keyed by the path of the
phases it runs inside (``unlearn/reference/lm_head``), so a parent's time includes its
children's. Off, a phase costs one environment lookup. Stages only *record*; the CLI prints the
table at the end of a command (:func:`render`) and :func:`mmie.core.artifacts.save` stores the
phases since the previous save in the manifest's ``metrics.profile`` (:func:`since_mark`), so a
multi-seed run gives each artifact its own share. On CUDA a phase synchronizes the device when
it ends, so asynchronous kernels are charged to the phase that launched them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ENV = "MMIE_PROFILE"


@dataclass
class Profile:
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    stack: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    mark: dict[str, tuple[float, int]] = field(default_factory=dict)
    mark_time: float = field(default_factory=time.perf_counter)

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1


_ACTIVE: Profile | None = None


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def enable() -> None:
    """Turn profiling on for this process (and the processes it starts)."""
    os.environ[ENV] = "1"


def current() -> Profile | None:
    """The process's profile, started on first use; None when profiling is off."""
    global _ACTIVE
    if not enabled():
        return None
    if _ACTIVE is None:
        _ACTIVE = Profile()
    return _ACTIVE


def reset() -> None:
    global _ACTIVE
    _ACTIVE = None


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name`` inside the phases already open (also a decorator)."""
    prof = current()
    if prof is None:
        yield
        return
    prof.stack.append(name)
    key, start = "/".join(prof.stack), time.perf_counter()
    try:
        yield
    finally:
        _sync()
        prof.add(key, time.perf_counter() - start)
        prof.stack.pop()


def _table(seconds: dict[str, float], calls: dict[str, int], wall: float) -> dict:
    order = sorted(seconds, key=lambda k: k.split("/"))  # a phase's children right after it
    phases = {k: {"seconds": round(seconds[k], 6), "calls": calls[k]} for k in order}
    return {"wall_seconds": round(wall, 6), "phases": phases, "threads": _threads()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def snapshot() -> dict | None:
    """Every phase since profiling started: ``{wall_seconds, phases: {path: {seconds,
    calls}}, threads}``; None when profiling is off."""
    prof = current()
    if prof is None:
        return None
    return _table(prof.seconds, prof.calls, time.perf_counter() - prof.started)


def since_mark() -> dict | None:
    """The phases since the previous call (or the start), then move the mark to now."""
    prof = current()
    if prof is None:
        return None
    now = time.perf_counter()
    seconds, calls = {}, {}
    for key, total in prof.seconds.items():
        before_s, before_n = prof.mark.get(key, (0.0, 0))
        if prof.calls[key] > before_n:
            seconds[key], calls[key] = total - before_s, prof.calls[key] - before_n
    out = _table(seconds, calls, now - prof.mark_time)
    prof.mark = {k: (prof.seconds[k], prof.calls[k]) for k in prof.seconds}
    prof.mark_time = now
    return out


def render(table: dict) -> str:
    """A plain-text table: one indented line per phase, its seconds, share of wall, calls."""
    wall = max(table["wall_seconds"], 1e-9)
    lines = [f"{'phase':<44} {'seconds':>9} {'share':>6} {'calls':>6}"]
    for key, row in table["phases"].items():
        depth, name = key.count("/"), key.rsplit("/", 1)[-1]
        label = ("  " * depth + name)[:44]
        lines.append(f"{label:<44} {row['seconds']:>9.3f} {row['seconds'] / wall:>6.1%} "
                     f"{row['calls']:>6}")
    lines.append(f"{'wall (since start)':<44} {table['wall_seconds']:>9.3f} "
                 f"{'':>6} threads={table['threads']}")
    return "\n".join(lines)
