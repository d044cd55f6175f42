"""data=shards under DDP: two gloo ranks on the CPU each serve their own shards, and together every train sample
exactly once per epoch; the command trains on shards with trainer.devices=2."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import shelltrain
from shard_fixtures import overrides, served_under_ddp, write_shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shards(folder: Path) -> list[int]:
    written = write_shards(folder, "train", shards=4, per_shard=6, classes=2)
    write_shards(folder, "val", shards=1, per_shard=4, start=100)
    write_shards(folder, "test", shards=1, per_shard=4, start=200)
    return written


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # workers: +20 s
def test_two_ranks_serve_every_train_sample_once_an_epoch(tmp_path, workers):
    written = _shards(tmp_path / "shards")
    out = tmp_path / "served.json"
    mp.spawn(served_under_ddp, args=(2, _free_port(), tmp_path / "shards", out, workers), nprocs=2)
    ranks = json.loads(out.read_text())
    for epoch in (0, 1):
        served = [rank[epoch]["ids"] for rank in ranks]
        assert sorted(served[0] + served[1]) == written  # all 24, none twice
        assert len(served[0]) == len(served[1]) == 12
        # a rank's 12 samples in batches of 4, or each of its 2 workers' 6 in a batch of 4 and one of 2
        assert ranks[0][epoch]["steps"] == ranks[1][epoch]["steps"] == (3 if workers == 0 else 4)
    assert ranks[0][0]["ids"] != ranks[0][1]["ids"]  # reshuffled per epoch


@pytest.mark.slow  # two torchrun ranks started by the command
def test_the_command_trains_on_shards_with_two_processes(tmp_path):
    _shards(tmp_path / "shards")
    args = [*overrides(tmp_path / "shards", 4), "trainer.devices=2", "trainer.device=cpu", "trainer.epochs=2"]
    result = shelltrain(*args, "data.batch_size=4", "plots=false", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs_completed"] == 2
    assert "every sample once an epoch" in (tmp_path / "run/train.log").read_text()
