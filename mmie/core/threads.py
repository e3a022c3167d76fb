"""How many CPU threads torch uses: one per physical core this process may run on.

PyTorch's default is every logical CPU of the machine, which on a small, shared or hyperthreaded
machine oversubscribes the cores: OpenMP threads then spin waiting for each other and small
operations get hundreds of times slower (measured on a loaded 2-core machine). So the CLI calls
:func:`configure` once at start: intra-op threads = the physical cores in this process's CPU
affinity (``os.sched_getaffinity``, which ``taskset`` and container cpusets narrow), further
capped by a cgroup CPU quota (``cpu.max``), less the cores other processes already keep busy
(tasks running now, from /proc/loadavg), at least 1; inter-op threads = 1 (mmie never runs
independent operators in parallel). An explicit ``MMIE_THREADS`` or ``OMP_NUM_THREADS`` wins, in
that order. Measured (``bench/bench_unlearn_speedups.py``, random Gemma-3-270M-shaped model, 2
cores with a load average of 3-4 from other jobs): one unlearn step took 11.3 s with 2 threads
and 2.2 s with 1.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

ENV = ("MMIE_THREADS", "OMP_NUM_THREADS")
_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_MAX = Path("/sys/fs/cgroup/cpu.max")


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sys_cpu: Path = _SYS_CPU) -> int:
    """Distinct (package, core) pairs among ``cpus``; the CPU count where topology is unknown."""
    cores = set()
    for cpu in cpus:
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def quota_cpus(path: Path = _CGROUP_MAX) -> int | None:
    """CPUs a cgroup v2 quota allows (``cpu.max``: "quota period" or "max period")."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def explicit() -> int | None:
    """The thread count the user asked for through the environment, if any (ValueError if
    it is not a positive integer)."""
    for name in ENV:
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            return int(value)
    return None


_PROC_LOADAVG = Path("/proc/loadavg")


def running_others(text: str) -> int:
    """Other runnable tasks now, from /proc/loadavg's "running/total" field (which counts the
    reader itself)."""
    return max(0, int(text.split()[3].split("/")[0]) - 1)


def _load(samples: int = 5, pause: float = 0.02) -> float:
    # Tasks running *now*, the median of a few samples, not the 1-minute average: that
    # average still counts the pipeline stage that just exited, and made every stage of a
    # sequential `make demo` on an otherwise idle 2-core machine run on one thread.
    try:
        seen = []
        for _ in range(samples):
            seen.append(running_others(_PROC_LOADAVG.read_text()))
            time.sleep(pause)
        return float(sorted(seen)[len(seen) // 2])
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not Unix
        return 0.0


def idle_cores(cores: int, load: float) -> int:
    """The cores other work leaves free: ``cores`` minus the other tasks running (sampled
    before this process does any work), rounded, at least 1."""
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def wanted(load: float | None = None) -> int:
    """The intra-op thread count :func:`configure` sets: the explicit one, else the physical
    cores available to this process that other processes do not keep busy."""
    if (n := explicit()) is not None:
        return n
    n = physical_cores(_allowed_cpus())
    quota = quota_cpus()
    n = n if quota is None else min(n, quota)
    return idle_cores(n, _load() if load is None else load)


def configure() -> int:
    """Set torch's intra-op threads to :func:`wanted` and inter-op threads to 1; returns the
    intra-op count. Inter-op threads can be set only before torch's first parallel work, so a
    late call leaves them as they are."""
    import torch

    n = wanted()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already started
        pass
    return n
