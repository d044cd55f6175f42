"""trainer.threads=null: torch's one thread per core, held to the cores a cgroup's CPU quota allows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shelltrain import cores, environment


def test_cgroup_v2_quota_in_cores(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cores.cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores.cpu_quota(tmp_path) is None


def test_cgroup_v1_quota_in_cores(tmp_path: Path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cores.cpu_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cores.cpu_quota(tmp_path) is None
    assert cores.cpu_quota(tmp_path / "missing") is None


def test_usable_cores_are_the_affinity_mask_held_to_the_quota(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(cores, "affinity_cores", lambda: 16)
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cores.usable_cores(tmp_path) == 3  # 2.5 cores of quota: three threads share them
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores.usable_cores(tmp_path) == 16


def test_a_quota_below_torchs_default_sets_the_threads(monkeypatch):
    monkeypatch.setattr(environment, "usable_cores", lambda: 1)
    before = torch.get_num_threads()
    try:
        environment.seed_everything(0, deterministic=False, threads=None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(environment, "usable_cores", lambda: before + 4)
    assert environment.quota_threads() is None  # more cores than torch uses: its default stays


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) sets the affinity mask")
def test_torch_already_follows_the_affinity_mask():
    # Why only the quota needs shelltrain's help: torch's default is the cores of the process's affinity mask.
    code = "import os, torch; print(torch.get_num_threads(), len(os.sched_getaffinity(0)))"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_a_busy_machine_makes_the_threads_wait_asleep(monkeypatch):
    from shelltrain.cli import wait_passively_when_busy

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not wait_passively_when_busy(load=cores - 0.5)  # a quiet machine: OpenMP's default
    assert "OMP_WAIT_POLICY" not in os.environ
    assert wait_passively_when_busy(load=cores + 1.0)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice stays
    assert not wait_passively_when_busy(load=cores + 10.0)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
