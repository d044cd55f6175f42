"""task=lr_find: the learning-rate range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks").

A copy of the configured model trains one batch per step while the learning rate grows exponentially from
lr_find.start_lr to lr_find.end_lr over lr_find.steps steps; the loss is smoothed (an exponential moving average,
bias-corrected) and the ramp stops once it exceeds lr_find.diverge times its lowest value, or is not finite.
The suggestion is where the smoothed loss falls fastest against log(lr) (before its minimum); `min_div_10`, a tenth
of the LR at the minimum, is recorded beside it. Writes lr_find.json and plots/lr_find.png in the run directory.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from shelltrain import rundir
from shelltrain.console import print_summary, say
from shelltrain.engine import autocast, criterion
from shelltrain.optim import build_optimizer
from shelltrain.placement import batch_to_device, place
from shelltrain.plots import plot_lr_find
from shelltrain.runner import build


def find_lr(cfg: DictConfig, run_dir: Path, console: Any) -> None:
    """Run the ramp on the configured model and data, write its files and print the suggested override."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    job = build(cfg, None, [], console)
    model = copy.deepcopy(job.model)  # the ramp wrecks the weights it trains
    optimizer = build_optimizer(cfg.optimizer, model)
    rows = ramp(model, optimizer, job.data.train, job.settings, cfg.lr_find)
    choice = suggest(rows)
    report = {"status": "completed", "task": "lr_find", **choice, "steps_run": len(rows)}
    report.update(start_lr=cfg.lr_find.start_lr, end_lr=cfg.lr_find.end_lr, steps=cfg.lr_find.steps)
    rundir.write_json({**report, "rows": rows}, rundir.lr_find_report(run_dir))
    if cfg.plots:
        plot_lr_find(rows, choice["suggested_lr"], rundir.lr_find_plot(run_dir))
    summary = {**report, "wall_seconds": round(time.perf_counter() - started, 3), "run_dir": str(run_dir)}
    rundir.write_json(summary, rundir.summary(run_dir))
    print_summary(console, summary)
    say(
        console, f"suggested: [bold]optimizer.lr={choice['suggested_lr']:.3g}[/bold] ({rundir.lr_find_report(run_dir)})"
    )


def ramp(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, settings: Any, options: DictConfig
) -> list[dict[str, float]]:
    """One row per step: lr, loss, smoothed loss; stops early when the smoothed loss diverges."""
    place(model, settings)
    model.train()
    steps, start, end = int(options.steps), float(options.start_lr), float(options.end_lr)
    beta = 1.0 - float(options.smoothing)
    average, best, rows = 0.0, math.inf, []
    for step, (images, targets) in zip(range(steps), _forever(loader)):
        lr = start * (end / start) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = batch_to_device(images, targets, settings)
        with autocast(settings):
            loss = criterion(model(images), targets, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        average = beta * average + (1 - beta) * value
        smoothed = average / (1 - beta ** (step + 1))
        rows.append({"lr": lr, "loss": value, "smoothed": smoothed})
        best = min(best, smoothed)
        if smoothed > float(options.diverge) * best:
            break
    return rows


def suggest(rows: list[dict[str, float]]) -> dict[str, float]:
    """`suggested_lr`: the steepest descent of the smoothed loss against log(lr), up to its minimum; `min_div_10`:
    a tenth of the LR at the minimum; `min_loss_lr`: that LR."""
    smoothed = np.array([row["smoothed"] for row in rows])
    lrs = np.array([row["lr"] for row in rows])
    lowest = int(smoothed.argmin())
    if lowest < 2:  # too few points before the minimum for a slope
        steepest = lrs[lowest] / 10
    else:
        slope = np.gradient(smoothed[: lowest + 1], np.log(lrs[: lowest + 1]))
        steepest = lrs[int(slope.argmin())]
    return {"suggested_lr": float(steepest), "min_div_10": float(lrs[lowest] / 10), "min_loss_lr": float(lrs[lowest])}


def _forever(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (a ramp may be longer than one epoch)."""
    while True:
        yield from loader
