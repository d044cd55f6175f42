"""Optimizer and learning-rate schedule from their `_target_` configs.

shelltrain reads a few keys of its own from these groups and passes the rest to the target:
`optimizer.no_decay_norm_bias`, `scheduler.interval` and `scheduler.total_steps` (filled here).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger("shelltrain")


def build_optimizer(
    cfg: DictConfig, model: nn.Module, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """Instantiate the optimizer; optionally exempt norm weights and biases from weight decay.

    `groups` (from a fine-tuning policy) are {"name", "params", "lr_mult"} dicts: each gets lr x lr_mult and keeps
    its `lr_mult` so schedules that set the rate themselves (one-cycle's max_lr) can scale it too."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(kwargs, dict)
    no_decay_norm_bias = kwargs.pop("no_decay_norm_bias", False)
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    split_decay = no_decay_norm_bias and kwargs.get("weight_decay", 0.0) > 0
    param_groups: list[dict[str, Any]] = []
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        if "lr_mult" in options:
            options["lr"] = kwargs["lr"] * options["lr_mult"]
        if split_decay:
            param_groups.append({**options, "params": [p for p in group["params"] if p.ndim > 1]})
            # biases and norm scales/shifts
            param_groups.append({**options, "params": [p for p in group["params"] if p.ndim <= 1], "weight_decay": 0.0})
        else:
            param_groups.append({**options, "params": list(group["params"])})
    param_groups = [g for g in param_groups if g["params"]]
    plain = len(param_groups) == 1 and set(param_groups[0]) == {"params"}
    return instantiate(kwargs, params=param_groups[0]["params"] if plain else param_groups, _convert_="all")


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
    one_cycle = str(kwargs["_target_"]).endswith("OneCycleLR") and kwargs.get("total_steps") is not None
    if one_cycle and not fit_one_cycle(kwargs):
        log.warning(
            "a run of %s optimizer step(s) is too short for a one-cycle schedule: the rate stays at lr",
            kwargs.get("total_steps"),
        )
        return None
    mults = [group.get("lr_mult", 1.0) for group in optimizer.param_groups]
    if isinstance(kwargs.get("max_lr"), (int, float)) and any(m != 1.0 for m in mults):
        kwargs["max_lr"] = [kwargs["max_lr"] * m for m in mults]  # one-cycle sets every group's rate itself
    scheduler = instantiate(kwargs, optimizer=optimizer, _convert_="all")
    on_metric = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return Schedule(scheduler, interval, on_metric)


def fit_one_cycle(kwargs: dict[str, Any]) -> bool:
    """Clamp OneCycleLR's pct_start so that every phase lasts at least one step (torch divides by each phase's
    length: pct_start=0.25 of 4 steps is a zero-length warm-up and a ZeroDivisionError). False: the run is too
    short for the phases at all (fewer than 3 steps, 4 with three_phase)."""
    total = int(kwargs["total_steps"])
    three_phase = bool(kwargs.get("three_phase", False))
    low, high = 2 / total, (total / 2 if three_phase else total - 1) / total
    if low > high:
        return False
    pct = float(kwargs.get("pct_start", 0.3))
    fitted = min(max(pct, low), high)
    if fitted != pct:
        log.warning(
            "scheduler.pct_start=%g leaves a phase shorter than one step in %d steps; using %g", pct, total, fitted
        )
        kwargs["pct_start"] = fitted
    return True


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

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step, f=f: factor(step, f) for f in floor])
