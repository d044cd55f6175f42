"""Freed host memory kept for the process's next allocations instead of handed back to the kernel at every step.

A CPU training step frees and re-allocates the same activations, gradients and weight-gradient copies. glibc's
malloc gives large freed blocks back to the kernel (munmap, or trimming the heap top past M_TRIM_THRESHOLD), so
the next step faults the same memory back in, page by page, zero-filled by the kernel: a resnet18 epoch on 32 px
digits faulted 224-685K pages (0.9-2.7 GB) and ran 2.9-4.5 s instead of 2.4-3.3 s; a plain PyTorch loop does the
same on some epochs and not on others. `trainer.host_memory_cache_mib` keeps up to that much freed memory for
reuse, as the CUDA caching allocator does on a GPU and jemalloc or tcmalloc (PyTorch's CPU tuning guide suggests
them) do on the host: blocks under 32 MiB come from the heap, and the heap holds up to the cache's size free
before it shrinks. The process keeps its memory until it exits, and its peak grows a little (the default job's
maximum resident set: 1.18 GB instead of 1.05 GB). glibc only (Linux): other C libraries' allocators are left as
they are.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest M_MMAP_THRESHOLD glibc takes on 64-bit systems
CACHE_MAX_MIB = 2047  # mallopt takes a C int of bytes (trainer.host_memory_cache_mib is checked against it)


def cache_freed_memory(mib: int) -> bool:
    """Keep up to `mib` MiB of freed host memory for reuse; 0 (or a C library other than glibc) leaves the
    allocator's own policy. True when the policy was set."""
    if mib <= 0 or not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    size = mib * 2**20
    return bool(mallopt(M_MMAP_THRESHOLD, min(size, MMAP_THRESHOLD_MAX))) and bool(mallopt(M_TRIM_THRESHOLD, size))


def is_glibc() -> bool:
    """Whether this process runs on glibc, whose malloc takes mallopt's settings."""
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (macOS, musl)
        return False
