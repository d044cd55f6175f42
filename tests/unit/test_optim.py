"""Optimizer parameter groups and schedule sizing from `_target_` configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf, open_dict
from torch import nn

from shelltrain.optim import build_optimizer, build_scheduler

SGD = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_plain_optimizer_has_one_group_of_trainable_parameters():
    net = model()
    net[0].weight.requires_grad_(False)
    optimizer = build_optimizer(OmegaConf.create(SGD), net)
    assert len(optimizer.param_groups) == 1
    assert all(p is not net[0].weight for p in optimizer.param_groups[0]["params"])
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_no_decay_norm_bias_exempts_biases_and_norm_parameters():
    net = model()
    optimizer = build_optimizer(OmegaConf.create({**SGD, "no_decay_norm_bias": True}), net)
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert len(exempt["params"]) == 4  # two biases, the norm's weight and bias


def test_param_groups_scale_the_learning_rate():
    net = model()
    groups = [
        {"name": "head", "params": list(net[2].parameters()), "lr_mult": 1.0},
        {"name": "backbone", "params": [*net[0].parameters(), *net[1].parameters()], "lr_mult": 0.1},
    ]
    optimizer = build_optimizer(OmegaConf.create(SGD), net, groups)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.01])
    assert [g["name"] for g in optimizer.param_groups] == ["head", "backbone"]


def test_scheduler_total_steps_follow_the_run_and_its_interval():
    optimizer = build_optimizer(OmegaConf.create(SGD), model())
    onecycle = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.1, "total_steps": None}
    per_step = build_scheduler(OmegaConf.create({**onecycle, "interval": "step"}), optimizer, 3, 7, "max")
    assert per_step.interval == "step" and per_step.scheduler.total_steps == 21
    per_epoch = build_scheduler(OmegaConf.create(onecycle), optimizer, 3, 7, "max")
    assert per_epoch.interval == "epoch" and per_epoch.scheduler.total_steps == 3


def test_plateau_takes_the_monitor_mode_and_none_is_no_schedule():
    optimizer = build_optimizer(OmegaConf.create(SGD), model())
    plateau = {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "mode": None}
    schedule = build_scheduler(OmegaConf.create(plateau), optimizer, 3, 7, "min")
    assert schedule.on_metric and schedule.scheduler.mode == "min"
    assert build_scheduler(OmegaConf.create({"_target_": None}), optimizer, 3, 7, "max") is None
    assert isinstance(optimizer, torch.optim.SGD)


SCHEDULERS = sorted(p.stem for p in (Path(__file__).parents[2] / "configs" / "scheduler").glob("*.yaml"))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_schedule_runs_for_every_run_length(name):
    """A run of any length from 1 to 10 optimizer steps (one epoch of that many batches, or that many one-batch
    epochs) builds and steps the packaged schedule at a finite, non-negative rate (one-cycle used to divide by a
    zero-length phase in a 4-step run)."""
    cfg = compose_config(f"scheduler={name}", "optimizer=sgd", "optimizer.lr=0.1")
    for steps in range(1, 11):
        for epochs, per_epoch in ((1, steps), (steps, 1)):
            net = model()
            optimizer = build_optimizer(cfg.optimizer, net)
            with open_dict(cfg):
                cfg.trainer.epochs = epochs
            schedule = build_scheduler(cfg.scheduler, optimizer, epochs, per_epoch, "max")
            for _ in range(epochs):
                for _ in range(per_epoch):
                    optimizer.step()
                    if schedule is not None and schedule.interval == "step":
                        schedule.scheduler.step()
                if schedule is not None and schedule.interval == "epoch":
                    schedule.scheduler.step(0.5) if schedule.on_metric else schedule.scheduler.step()
                rate = optimizer.param_groups[0]["lr"]
                assert math.isfinite(rate) and rate >= 0, (name, epochs, per_epoch, rate)
