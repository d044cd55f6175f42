"""trainer.host_memory_cache_mib: freed host memory is kept for reuse, so repeated allocations stop faulting."""

import subprocess
import sys

import pytest

from shelltrain.host_memory import cache_freed_memory, is_glibc

# Ten 8 MiB blocks allocated, written and freed four times: glibc's default policy gives the heap back after each
# round (80 MiB > its trim threshold), so every round faults all 20,480 pages in again.
ROUNDS = """
import resource, sys
from shelltrain.host_memory import cache_freed_memory
print(cache_freed_memory(int(sys.argv[1])))
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [bytearray(8 << 20) for _ in range(10)]
    del blocks
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_per_round(mib: int) -> tuple[bool, list[int]]:
    lines = subprocess.run([sys.executable, "-c", ROUNDS, str(mib)], capture_output=True, text=True, check=True)
    first, *rounds = lines.stdout.split()
    return first == "True", [int(n) for n in rounds]


@pytest.mark.skipif(not is_glibc(), reason="the cache is glibc's malloc policy")
def test_cached_memory_is_reused_without_page_faults():
    set_default, default = faults_per_round(0)
    set_cached, cached = faults_per_round(256)
    assert (set_default, set_cached) == (False, True)
    pages = (80 << 20) // 4096
    assert min(default[1:]) > pages // 2  # the system policy returns the memory every round
    assert max(cached[1:]) < pages // 20  # the cache keeps it: later rounds reuse the same pages


def test_zero_leaves_the_allocator_alone():
    assert cache_freed_memory(0) is False
