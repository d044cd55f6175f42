"""Where a job runs: the GPU each parallel sweep job is given (a fake device count: no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from shelltrain.environment import resolve_device


def _in_sweep_job(monkeypatch: pytest.MonkeyPatch, n_jobs: int | None, num: int, gpus: int) -> list[int]:
    """This process as job `num` of a launcher running `n_jobs` at once on a machine with `gpus` GPUs; returns the
    list the job's torch.cuda.set_device calls go to."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    launcher = {"_target_": "JoblibLauncher", "n_jobs": n_jobs} if n_jobs else {}
    hydra_cfg = OmegaConf.create({"hydra": {"launcher": launcher, "job": {"num": num}}})
    monkeypatch.setattr(HydraConfig.instance(), "cfg", hydra_cfg)
    return chosen


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_parallel_sweep_jobs_each_get_their_own_gpu_round_robin(monkeypatch, device):
    given = []
    for num in range(6):
        chosen = _in_sweep_job(monkeypatch, n_jobs=3, num=num, gpus=3)
        given.append(resolve_device(device))
        assert chosen == [given[-1].index]  # set as the current device too: a bare "cuda" lands there
    assert given == [torch.device("cuda", k % 3) for k in range(6)]


def test_one_job_at_a_time_one_gpu_or_an_explicit_index_keep_the_device_as_named(monkeypatch):
    _in_sweep_job(monkeypatch, n_jobs=None, num=1, gpus=4)  # the basic launcher: one job at a time
    assert resolve_device("cuda") == torch.device("cuda")
    _in_sweep_job(monkeypatch, n_jobs=2, num=1, gpus=1)
    assert resolve_device("cuda") == torch.device("cuda")
    chosen = _in_sweep_job(monkeypatch, n_jobs=2, num=1, gpus=4)
    assert resolve_device("cuda:3") == torch.device("cuda", 3) and chosen == []
