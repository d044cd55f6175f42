"""Optimizer and learning-rate schedule from their `_target_` configs.

shelltrain reads a few keys of its own from these groups and passes the rest to the target:
`optimizer.no_decay_norm_bias`, `scheduler.interval` and `scheduler.total_steps` (filled here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Instantiate the optimizer; optionally exempt norm weights and biases from weight decay."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(kwargs, dict)
    no_decay_norm_bias = kwargs.pop("no_decay_norm_bias", False)
    params = [p for p in model.parameters() if p.requires_grad]
    if no_decay_norm_bias and kwargs.get("weight_decay", 0.0) > 0:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # biases and norm scales/shifts
        groups: Any = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = params
    return instantiate(kwargs, params=groups, _convert_="all")


@dataclass
class Schedule:
    """A scheduler, when to step it, and whether its step takes the monitored metric (plateau)."""

    scheduler: Any
    interval: str  # "epoch" or "step"
    on_metric: bool


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, monitor_mode: str
) -> Schedule | None:
    """Instantiate the schedule, sizing it from the run's length and the monitored metric's mode."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(kwargs, dict)
    interval = kwargs.pop("interval", "epoch")
    if not kwargs.get("_target_"):
        return None
    if "total_steps" in kwargs and kwargs["total_steps"] is None:
        kwargs["total_steps"] = max(1, epochs * (steps_per_epoch if interval == "step" else 1))
    if "mode" in kwargs and kwargs["mode"] is None:
        kwargs["mode"] = monitor_mode
    scheduler = instantiate(kwargs, optimizer=optimizer, _convert_="all")
    on_metric = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return Schedule(scheduler, interval, on_metric)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.1,
    start_factor: float = 0.01,
    eta_min: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay, as one LambdaLR so its state_dict is plain numbers."""
    warmup = max(1, int(total_steps * warmup_fraction))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    floor = [eta_min / lr if lr > 0 else 0.0 for lr in base_lrs]

    def factor(step: int, floor: float) -> float:
        if step < warmup:
            return start_factor + (1.0 - start_factor) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, f=f: factor(step, f) for f in floor]
    )
