"""How many CPU cores this process may use: its affinity mask, held to its cgroup's CPU quota (docker --cpus,
Kubernetes CPU limits), which torch's one thread per host core ignores. Torch-free: the CLI asks before a job
imports torch, and the run's thread settings (environment.py) ask the same."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: those of its affinity mask, at most its cgroup's CPU quota (rounded up)."""
    cores = affinity_cores()
    quota = cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us over
    cpu.cfs_period_us); None when there is none or it cannot be read."""
    try:
        if (cgroup / "cpu.max").is_file():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        for folder in (cgroup / "cpu", cgroup / "cpu,cpuacct", cgroup):
            if (folder / "cpu.cfs_quota_us").is_file():
                quota_us = int((folder / "cpu.cfs_quota_us").read_text())
                period_us = int((folder / "cpu.cfs_period_us").read_text())
                return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):  # an unreadable or unexpected file: no quota known, torch's default stays
        return None
    return None


def affinity_cores() -> int:
    """The cores of this process's affinity mask (taskset, a container's cpuset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
