"""task=lr_find: the learning-rate range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks").

A copy of the configured model trains one batch per step while the learning rate grows exponentially from
lr_find.start_lr to lr_find.end_lr over lr_find.steps steps; the loss is smoothed (an exponential moving average,
bias-corrected) and the ramp stops once it exceeds lr_find.diverge times its lowest value, or is not finite.
The suggestion is where the smoothed loss falls fastest against log(lr), among the steps before its minimum and
before it first exceeded lr_find.diverge times its lowest value; `min_div_10`, a tenth of the LR at the minimum, is
recorded beside it. When the loss never fell over the ramp (it rose or diverged from the start) there is
no good rate in the range: the run says so and exits non-zero instead of printing a number. Writes lr_find.json and
plots/lr_find.png in the run directory.
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

from shelltrain import rundir, summary
from shelltrain.console import print_summary, say
from shelltrain.engine import autocast, criterion
from shelltrain.errors import UserError
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
    rows = ramp(model, optimizer, job.data.train, job.settings, cfg.lr_find, job.scaler)
    report_ramp(cfg, rows, suggest(rows, float(cfg.lr_find.diverge)), run_dir, started, console)


def report_ramp(
    cfg: DictConfig, rows: list[dict[str, float]], choice: dict[str, Any], run_dir: Path, started: float, console: Any
) -> None:
    """Write lr_find.json, the plot and summary.json, and print the override to train with; without a good rate,
    say why and raise UserError (the files stay, for a look at the curve)."""
    options = cfg.lr_find
    found = choice["suggested_lr"] is not None
    report = {"task": "lr_find", **choice, "steps_run": len(rows)}
    report.update(start_lr=options.start_lr, end_lr=options.end_lr, steps=options.steps)
    if not found:
        report["error"] = f"lr_find: no good learning rate found: {choice['no_suggestion']}"
    status = "completed" if found else "failed"
    rundir.write_json({"status": status, **report, "rows": rows}, rundir.lr_find_report(run_dir))
    if cfg.plots and rows:
        plot_lr_find(rows, choice["suggested_lr"], rundir.lr_find_plot(run_dir))
    result = summary.build(report, run_dir, started, status=status)
    summary.write(result, run_dir)
    print_summary(console, result)
    if not found:
        raise UserError(report["error"])
    where = rundir.lr_find_report(run_dir)
    say(console, f"suggested: [bold]optimizer.lr={choice['suggested_lr']:.3g}[/bold] ({where})")


def ramp(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    settings: Any,
    options: DictConfig,
    scaler: torch.amp.GradScaler,
) -> list[dict[str, float]]:
    """One row per step: lr, loss, smoothed loss; stops early when the smoothed loss diverges. The loss is scaled
    by the run's `scaler` (engine.make_scaler) as fit scales it: under 16-mixed, fp16 gradients would otherwise
    underflow and the ramp would stop early, at the wrong rate."""
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
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
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


def suggest(rows: list[dict[str, float]], diverge: float) -> dict[str, Any]:
    """`suggested_lr`: the steepest descent of the smoothed loss against log(lr), up to its minimum and before the
    loss diverged (`diverge`: lr_find.diverge); `min_div_10`: a tenth of the LR at the minimum; `min_loss_lr`: that
    LR. Without a descent to read, `suggested_lr` is None and `no_suggestion` says why and what to change."""
    usable = rows[: _divergence(rows, diverge)]
    if not usable:
        return _no_rate("the loss was not finite at the first step; lower lr_find.start_lr", rows)
    smoothed = np.array([row["smoothed"] for row in usable])
    lrs = np.array([row["lr"] for row in usable])
    lowest = int(smoothed.argmin())
    if lowest < 2:  # the minimum is at the start: the loss only rose (or diverged) over the range
        return _no_rate(
            f"the loss did not fall from lr_find.start_lr={rows[0]['lr']:.3g} up to lr={rows[-1]['lr']:.3g}, where "
            "the ramp stopped; lower lr_find.start_lr (e.g. 1000x lower)",
            rows,
        )
    slope = np.gradient(smoothed[: lowest + 1], np.log(lrs[: lowest + 1]))
    steepest = lrs[int(slope.argmin())]
    return {"suggested_lr": float(steepest), "min_div_10": float(lrs[lowest] / 10), "min_loss_lr": float(lrs[lowest])}


def _divergence(rows: list[dict[str, float]], diverge: float) -> int:
    """The index of the first step whose smoothed loss exceeded `diverge` times its lowest value before it (the
    ramp's own stopping rule: rows from elsewhere may go on after it); len(rows) when none did."""
    lowest = math.inf
    for index, row in enumerate(rows):
        if row["smoothed"] > diverge * lowest:
            return index
        lowest = min(lowest, row["smoothed"])
    return len(rows)


def _no_rate(reason: str, rows: list[dict[str, float]]) -> dict[str, Any]:
    """No suggestion: `reason` instead of the rates, and the LR of the lowest smoothed loss seen, for reference."""
    lowest = min(rows, key=lambda row: row["smoothed"]) if rows else None
    return {
        "suggested_lr": None,
        "no_suggestion": reason,
        "min_div_10": None,
        "min_loss_lr": float(lowest["lr"]) if lowest else None,
    }


def _forever(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (a ramp may be longer than one epoch)."""
    while True:
        yield from loader
