"""What rank 0 does alone after DDP training (SWA's BatchNorm pass, the calibration temperature): two CPU ranks on
gloo, started with fork from this process (no new interpreter to import torch in). Rank 0 must see the whole train
and val splits, as one process does, and a SyncBatchNorm model (trainer.sync_batchnorm) must not enter a collective
the other rank never joins."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compose_config
from torch import nn
from torch.optim.swa_utils import AveragedModel

from shelltrain import rundir
from shelltrain.averaging import swa_test_metrics
from shelltrain.calibration import calibrate
from shelltrain.checkpoint import save_checkpoint
from shelltrain.data import build_data
from shelltrain.engine import predict
from shelltrain.models import build_model
from shelltrain.schema import defaults

ARGS = ["model=cnn", "model.width=4", "data.image_size=8", "data.limit_samples=160", "data.num_workers=0"]


def _rank0_alone(root: Path, sync_batchnorm: bool) -> tuple[dict, dict]:
    """Rank 0's SWA figures and calibration section for the model saved in `root`; as one process when no group is
    up. The SWA pass's model (swa.pt) is written to root/<ranks>/."""
    cfg = compose_config(*ARGS)
    data = build_data(cfg.data, cfg.augmentation, cfg.trainer.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    model.load_state_dict(torch.load(root / "model.pt", weights_only=True))
    if sync_batchnorm:  # what engine.trainable does under DDP with trainer.sync_batchnorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    settings = defaults("trainer", device=torch.device("cpu"), calibrate="temperature", threads=1)
    run_dir = root / str(dist.get_world_size() if dist.is_initialized() else 1)
    averaged = AveragedModel(model)
    averaged.update_parameters(model)
    save_checkpoint({"model": model.state_dict(), "swa": averaged.state_dict()}, rundir.last_checkpoint(run_dir))
    swa = swa_test_metrics(model, data.train, data.test, settings, run_dir, {})
    tested = predict(model, data.test, settings)
    return swa, calibrate("temperature", model, data, settings, run_dir, tested)


def _rank(rank: int, root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=(root / "port").read_text(), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:  # as runner.train_and_test: the other ranks are done after training
            swa, calibration = _rank0_alone(root, sync_batchnorm=True)
            torch.save({"swa": swa, "calibration": calibration}, root / "rank0.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rank0_alone_after_ddp_uses_whole_splits_and_no_sync_batchnorm_collective(tmp_path: Path):
    """With 2 ranks, the temperature and SWA's BatchNorm statistics equal one process's for the same weights (they
    came from rank 0's half of val and of train); a SyncBatchNorm model passes the train split in train mode
    without waiting for rank 1 (on a GPU it hung until the process group's timeout; on the CPU it raises)."""
    cfg = compose_config(*ARGS)
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "port").write_text(str(_free_port()))
    mp.start_processes(_rank, args=(tmp_path,), nprocs=2, start_method="fork")
    ranks = torch.load(tmp_path / "rank0.pt", weights_only=False)
    swa, calibration = _rank0_alone(tmp_path, sync_batchnorm=False)
    assert ranks["calibration"]["calibration"]["temperature"] == calibration["calibration"]["temperature"]
    two = torch.load(tmp_path / "2" / "checkpoints" / "swa.pt", weights_only=True)["model"]
    one = torch.load(tmp_path / "1" / "checkpoints" / "swa.pt", weights_only=True)["model"]
    statistics = [key for key in one if key.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.allclose(two[key], one[key]) for key in statistics)
    assert ranks["swa"]["swa_test_acc"] == swa["swa_test_acc"]
