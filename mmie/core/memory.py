"""Freed memory kept for the next large tensor instead of returned to the system (glibc only).

For Gemma 3's 262,144-id vocabulary a chunk of logits, its softmax or its gradient is a tensor
of tens to hundreds of MB, made and freed many times per step. glibc serves every allocation
above its mmap threshold (32 MB at most) with fresh pages from the kernel and unmaps them on
free, so each such tensor is paid again in page faults: on the 2-core machine they cost about
as much as the matmul that fills the tensor (``bench/bench_unlearn_step.py``: one exact-KL step
of the default model 1.49 s with the default allocator, 1.19 s with this setting).

:func:`keep_freed_memory` turns that off for the process: no mmap for large blocks (they come
from the heap, and a freed one is reused by the next) and no trimming of the heap's top below
2 GiB. The process keeps its peak heap until it exits, which a CLI run that ends with its stage
can afford. The CLI calls it once at start; ``MMIE_MALLOC=system`` keeps the system's
behaviour. Elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "MMIE_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_TRIM_BYTES = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Set the allocator as the module docstring says; True when it was set."""
    if os.environ.get(ENV, "").strip().lower() == "system":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None:  # musl, macOS: no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
