"""The pipeline end to end, in-process with Hydra's compose API and tiny settings."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_config, run_in_process

CNN = ["model=cnn", "model.width=8", "scheduler=none", "data.image_size=16"]  # digits are 8x8: 16 loses nothing


def test_cnn_learns_digits_and_writes_a_complete_run_dir(tmp_path):
    summary = run_in_process(tmp_path, *CNN, "trainer.epochs=3", "optimizer=adam", "optimizer.lr=0.01")
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.6  # chance is 0.1
    assert summary["best_epoch"] in (1, 2, 3) and summary["params"] > 0
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert set(rows[0]) == {
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "images_per_second",
    }
    assert float(rows[-1]["images_per_second"]) > 0
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert summary["best_val_acc"] == pytest.approx(float(best["val_acc"]))
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "metrics", "config"} <= set(ckpt)
        assert ckpt["config"]["model"]["name"] == "cnn"
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["epoch"] == 3


def test_same_seed_same_result(tmp_path):
    args = [
        *CNN,
        "trainer.epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "augmentation=seed",
    ]
    a = run_in_process(tmp_path / "a", *args)
    b = run_in_process(tmp_path / "b", *args)
    run_in_process(tmp_path / "c", *args, "trainer.seed=1")
    wa = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["model"]
    wc = torch.load(tmp_path / "c/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["test_acc"] == b["test_acc"]


def test_overfit_debug_preset_drives_train_accuracy_up(tmp_path):
    summary = run_in_process(
        tmp_path, *CNN, "debug=overfit", "trainer.epochs=25", "optimizer=adam", "optimizer.lr=0.01"
    )
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_acc"]) == 1.0
    assert float(rows[-1]["train_loss"]) < 0.25 * float(rows[0]["train_loss"])
    assert summary["epochs_completed"] == 25


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(tmp_path, optimizer):
    summary = run_in_process(tmp_path, *CNN, f"optimizer={optimizer}", "trainer.epochs=1")
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.3  # chance is 0.1: one epoch of real steps
    configured = compose_config(f"optimizer={optimizer}").optimizer
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["lr"]) == pytest.approx(configured.lr)
    assert float(rows[0]["train_loss"]) < 2.3  # below log(10), the loss of a uniform guess
    # the optimizer that trained is the configured one, with its keys (the first group decays)
    group = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    for key, value in configured.items():
        if key not in ("_target_", "no_decay_norm_bias"):
            assert group[key] == pytest.approx(tuple(value) if key == "betas" else value), key


@pytest.mark.parametrize("scheduler", ["none", "step", "exponential", "cosine", "warmup_cosine", "onecycle", "plateau"])
def test_every_scheduler_moves_the_learning_rate_as_documented(tmp_path, scheduler):
    extra = ["scheduler.step_size=2"] if scheduler == "step" else []
    run_in_process(
        tmp_path,
        "model=cnn",
        "model.width=8",
        f"scheduler={scheduler}",
        "trainer.epochs=3",
        *extra,
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "optimizer=sgd",
        "optimizer.lr=0.1",
    )
    with open(tmp_path / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    if scheduler in ("none", "plateau"):  # plateau: patience 2 is not exhausted in 3 epochs
        assert lrs == [0.1, 0.1, 0.1]
    elif scheduler == "step":
        assert lrs == pytest.approx([0.1, 0.1, 0.01])
    else:
        assert lrs[-1] < lrs[0] or scheduler == "warmup_cosine" and lrs[-1] < max(lrs)


def test_no_decay_on_norm_and_bias_builds_two_groups():
    from shelltrain.models import build_model
    from shelltrain.optim import build_optimizer

    cfg = compose_config("model=cnn", "optimizer=adamw")
    model = build_model(cfg.model, 10, 1)
    optimizer = build_optimizer(cfg.optimizer, model)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


@pytest.mark.parametrize(
    "extra",
    [
        ["trainer.precision=bf16"],
        ["trainer.precision=16-mixed"],
        ["trainer.loss=mse"],
        ["trainer.label_smoothing=0.1", "trainer.l1=1e-5", "trainer.grad_clip=1.0", "trainer.accumulate=2"],
        ["augmentation=basic", "augmentation.mixup_alpha=0.2", "augmentation.cutmix_alpha=1.0"],
        ["trainer.channels_last=false", "data.channels=3"],
    ],
)
def test_training_options_run(tmp_path, extra):
    summary = run_in_process(tmp_path, *CNN, "debug=smoke", *extra)
    assert summary["status"] == "completed" and summary["test_loss"] == summary["test_loss"]  # not NaN


def test_precision_bf16_really_autocasts():
    from shelltrain.engine import autocast
    from shelltrain.schema import defaults

    settings = defaults("trainer", epochs=1, device=torch.device("cpu"), precision="bf16")
    with autocast(settings):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def test_early_stopping_stops_when_the_monitor_stalls(tmp_path):
    # lr so small that nothing improves after the first epoch: patience 1 stops at epoch 2
    summary = run_in_process(
        tmp_path,
        *CNN,
        "trainer.epochs=6",
        "trainer.patience=1",
        "optimizer=sgd",
        "optimizer.lr=1e-9",
        "trainer.limit_train_batches=2",
        "trainer.monitor=val_acc",
    )
    assert summary["stopped_early"] is True
    assert summary["epochs_completed"] < 6
