"""Scale and speed: DDP under torchrun on CPU (gloo), mixed precision on CPU, on-device data and its batched
augmentations, and the engine's metric bookkeeping."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_environment, compose_config, run_in_process
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shelltrain.data import build_data
from shelltrain.data.device import DeviceBatches, Flip, Shift, batched_augmentations
from shelltrain.engine import evaluate
from shelltrain.models import build_model
from shelltrain.schema import defaults

# Tiny and quick: 240 train images, 15 batches of 8 per rank and epoch.
DDP = [
    "model=cnn",
    "model.width=8",
    "data.limit_samples=240",
    "data.batch_size=8",
    "scheduler=none",
    "optimizer=adam",
    "optimizer.lr=0.003",
    "trainer.device=cpu",
    "trainer.threads=1",
    "logger=[csv,jsonl]",
    "plots=false",
]


def torchrun(*args: str, cwd: Path, processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "shelltrain",
        *args,
    ]
    return subprocess.run(
        command,
        cwd=cwd,
        env=cli_environment({"OMP_NUM_THREADS": "1", **(env or {})}),
        capture_output=True,
        text=True,
        timeout=240,
    )


def failure(result: subprocess.CompletedProcess) -> str:
    """What a failed torchrun said: each rank's own error lines (a C++ abort prints no [rankN] traceback and is
    easily cut off by the launcher's summary), then the end of the output."""
    lines = result.stderr.splitlines()
    own = [line for line in lines if re.search(r"terminate called|what\(\)|Fatal Python|\[rank[1-9]\]|Error", line)]
    return "\n".join([*own[:60], "...", result.stderr[-2500:]])


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/.hydra"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two ranks on CPU for two epochs, in the default ${now:...} run directory."""
    root = tmp_path_factory.mktemp("ddp")
    result = torchrun(*DDP, "trainer.epochs=2", cwd=root)
    assert result.returncode == 0, failure(result)
    found = run_dirs(root)
    assert len(found) == 1, found  # one run directory, not one per rank
    return found[0]


def test_torchrun_two_ranks_write_one_run_dir_with_global_metrics(ddp_run):
    assert len(list(ddp_run.parent.parent.glob("*/*"))) == 1  # no second (empty) directory from rank 1
    table = rows(ddp_run)
    assert [r["epoch"] for r in table] == ["1", "2"]
    assert (ddp_run / "metrics.csv").read_text().count("epoch,") == 1
    assert len((ddp_run / "metrics.jsonl").read_text().splitlines()) == 2
    log = (ddp_run / "train.log").read_text()
    assert log.count("epoch 2/2") == 1 and "in 2 processes (DDP" in log  # rank 0 alone logs
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2

    # What one process computes with the trained weights on the same splits: the reported accuracy is the
    # global one (both ranks' shards), not rank 0's half.
    cfg = compose_config(*DDP)
    data = build_data(cfg.data, cfg.augmentation, cfg.trainer.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    checkpoint = torch.load(ddp_run / "checkpoints/last.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    settings = defaults("trainer", epochs=0, device=torch.device("cpu"))
    val = evaluate(model, data.val, settings)
    assert len(data.val.dataset) == 144
    assert float(table[-1]["val_acc"]) == pytest.approx(val["acc"], abs=1e-6)
    assert float(table[-1]["val_loss"]) == pytest.approx(val["loss"], rel=1e-5)
    assert val["acc"] > 0.2  # learning: a match at chance level would prove little
    best = torch.load(ddp_run / "checkpoints/best.pt", weights_only=True)
    model.load_state_dict(best["model"])
    assert summary["test_acc"] == pytest.approx(evaluate(model, data.test, settings)["acc"], abs=1e-9)
    # 240 train images, 120 per rank in batches of 8: 15 optimizer steps per epoch
    assert checkpoint["step"] == 30 and len(checkpoint["rng_ranks"]) == 2


def test_torchrun_resumes_a_ddp_run(ddp_run):
    root = ddp_run.parents[2]
    result = torchrun(*DDP, "trainer.epochs=3", f"trainer.resume={ddp_run}", cwd=root)
    assert result.returncode == 0, failure(result)
    assert [r["epoch"] for r in rows(ddp_run)] == ["1", "2", "3"]
    checkpoint = torch.load(ddp_run / "checkpoints/last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (3, 45)
    assert run_dirs(root) == [ddp_run]  # continued in place, nothing new
    assert "resuming from" in (ddp_run / "train.log").read_text()


@pytest.mark.slow
def test_resumed_ddp_run_matches_an_uninterrupted_one(tmp_path):
    """Resuming under DDP is exact: two epochs, then a third from the checkpoint, give the same weights as
    three epochs in one go (every rank's data order, augmentation and dropout replay)."""
    args = [*DDP, "augmentation=basic", "model.dropout=0.2", "data.on_device=true"]
    for run in (
        ["trainer.epochs=2", "hydra.run.dir=resumed"],
        ["trainer.epochs=3", "trainer.resume=resumed"],
        ["trainer.epochs=3", "hydra.run.dir=straight"],
    ):
        result = torchrun(*args, *run, cwd=tmp_path)
        assert result.returncode == 0, failure(result)
    a = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "resumed")[-1]["val_acc"] == rows(tmp_path / "straight")[-1]["val_acc"]


@pytest.mark.slow
def test_a_crash_on_one_rank_ends_every_rank(tmp_path):
    """Rank 1 raises a few steps in; torchrun ends rank 0 too (its collective fails, or torchrun stops it)."""
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = torchrun(*DDP, "+model._target_=crashing_model.CrashOnRankOne", "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "planted crash on rank 1" in result.stderr
    summary = tmp_path / "run/summary.json"
    assert not summary.exists() or "completed" not in summary.read_text()


@pytest.mark.slow
def test_trainer_devices_launches_the_processes_itself(tmp_path):
    from conftest import shelltrain

    result = shelltrain(*DDP, "trainer.epochs=1", "trainer.devices=2", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, failure(result)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed"
    assert [r["epoch"] for r in rows(tmp_path / "run")] == ["1"]


@pytest.mark.slow
def test_torchrun_refuses_one_process_stages_with_one_line(tmp_path):
    """Rank 0 fails before it settles the run directory: the other rank is released and stays silent."""
    result = torchrun(*DDP, "cv.folds=2", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("shelltrain: error: cv.folds is not supported with several processes") == 1
    assert not list(tmp_path.glob("outputs/*/*"))  # the failed start leaves nothing behind


# -- mixed precision on CPU ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_mixed_precision_trains_on_cpu_and_checkpoints_the_scaler(tmp_path, precision):
    summary = run_in_process(
        tmp_path,
        "model=cnn",
        "model.width=8",
        "data.limit_samples=200",
        "trainer.epochs=2",
        "optimizer=adam",
        "optimizer.lr=0.01",
        f"trainer.precision={precision}",
        "trainer.grad_clip=1.0",
        "scheduler=none",
    )
    assert summary["status"] == "completed"
    losses = [float(r["train_loss"]) for r in rows(tmp_path)]
    assert losses[1] < losses[0] < 3  # finite and learning
    scaler = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["scaler"]
    if precision == "16-mixed":  # fp16 autocast with a GradScaler on the CPU: its scale travels in checkpoints
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    else:
        assert scaler == {}  # bf16 needs no loss scaling


def test_fp16_resume_restores_the_scaler(tmp_path):
    args = ["model=cnn", "model.width=8", "data.limit_samples=120", "trainer.precision=16-mixed", "scheduler=none"]
    run_in_process(tmp_path, *args, "trainer.epochs=1")
    saved = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["scaler"]
    from shelltrain.resume import restore_training

    cfg = compose_config(*args)
    data = build_data(cfg.data, cfg.augmentation, 0)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    payload = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    restore_training(payload, tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), None, scaler)
    assert scaler.get_scale() == saved["scale"]


# -- on-device data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
def test_batched_crop_gives_exactly_torchvisions_crops(mode):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    crop = v2.RandomCrop(8, padding=[1, 2, 3, 2], padding_mode=mode, fill=7)  # left, top, right, bottom
    (shift,), _ = batched_augmentations([crop], 8, ["RandomCrop"])
    out = shift(images)
    padded = F.pad(images, [1, 2, 3, 2], fill=7, padding_mode=mode)
    crops = {(top, left) for top in range(5) for left in range(5)}
    seen = set()
    for image, result in zip(padded, out):
        matches = [(top, left) for top, left in crops if torch.equal(image[:, top : top + 8, left : left + 8], result)]
        assert matches, "not a crop torchvision could have made"
        seen.add(matches[0])
    assert len(seen) > 10  # offsets vary per image


def test_batched_translate_and_flips():
    torch.manual_seed(0)
    images = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(200, 1, 1, 1)
    (translate,), _ = batched_augmentations([v2.RandomAffine(degrees=0, translate=(0.25, 0.25))], 4, ["RandomAffine"])
    out = translate(images)
    shifts = set()
    for result in out:
        found = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(result, F.affine(images[0], angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0]))
        ]
        assert found
        shifts.add(found[0])
    assert len(shifts) == 9
    flips = Flip(0.5, -1)(images)
    flipped = torch.tensor([torch.equal(f, images[0].flip(-1)) for f in flips])
    assert torch.equal(flips[~flipped], images[~flipped]) and 60 < int(flipped.sum()) < 140
    assert isinstance(translate, Shift)


def test_augmentations_without_a_batched_version_are_named():
    assert batched_augmentations([v2.AutoAugment()], 32, ["AutoAugment"]) == ([], "AutoAugment")
    ops, missing = batched_augmentations([v2.RandomRotation(10), v2.RandomHorizontalFlip()], 32, ["a", "b"])
    assert missing is None and len(ops) == 2


def test_on_device_batches_match_the_loader_path():
    cfg = compose_config("data.limit_samples=100", "data.batch_size=16", "data.on_device=true")
    loaders = build_data(cfg.data, cfg.augmentation, 0)
    on_device = build_data(cfg.data, cfg.augmentation, 0, device=torch.device("cpu"))
    assert isinstance(on_device.train, DeviceBatches) and len(on_device.train) == len(loaders.train) == 7
    for a, b in zip(loaders.test, on_device.test):  # no augmentation: the same normalized images
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    on_device.train.set_epoch(1)
    first = torch.cat([y for _, y in on_device.train])
    on_device.train.set_epoch(2)
    assert sorted(first.tolist()) == sorted(torch.cat([y for _, y in on_device.train]).tolist())
    assert not torch.equal(first, torch.cat([y for _, y in on_device.train]))  # a new order every epoch


def test_on_device_training_and_cross_validation(tmp_path):
    args = [
        "model=cnn",
        "model.width=8",
        "data.on_device=true",
        "augmentation=basic",
        "optimizer=adam",
        "optimizer.lr=0.01",
        "scheduler=none",
    ]
    summary = run_in_process(tmp_path / "train", *args, "trainer.epochs=3")
    assert summary["test_acc"] > 0.6
    summary = run_in_process(
        tmp_path / "cv", *args, "trainer.epochs=1", "cv.folds=2", "cv.refit=false", "data.limit_samples=100"
    )
    assert len(summary["cv"]["scores"]) == 2


def test_on_device_falls_back_to_loaders_for_unbatched_augmentation(capsys):
    cfg = compose_config("data.on_device=true", "augmentation=trivialaugment", "data.limit_samples=60")
    bundle = build_data(cfg.data, cfg.augmentation, 0, device=torch.device("cpu"))
    assert not isinstance(bundle.train, DeviceBatches)
    assert "data.on_device: TrivialAugmentWide has no batched form" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_keeps_plain_checkpoints(tmp_path):
    """trainer.compile trains a compiled module (its first epoch includes compiling: minutes on a small CPU);
    checkpoints hold the eager model's plain keys, which load anywhere."""
    summary = run_in_process(
        tmp_path,
        "model=cnn",
        "model.width=8",
        "data.limit_samples=128",
        "trainer.epochs=2",
        "trainer.compile=true",
        "scheduler=none",
    )
    assert summary["status"] == "completed"
    keys = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["step"] == 2 * (128 // 32)  # drop_last
