"""The pipeline, in order: data -> model -> optimizer -> train -> (prune) -> (ensemble) -> test -> report.

This is the only module that knows the order; each stage is a plain function from its own module.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn

from shelltrain.checkpoint import Checkpointer, load_checkpoint
from shelltrain.data import DataBundle, build_data
from shelltrain.engine import Callback, TrainSettings, TrainState, evaluate, fit, make_scaler, monitor_mode
from shelltrain.ensemble import load_model, run_ensemble, uses_ensemble
from shelltrain.errors import UserError
from shelltrain.models import build_model, count_parameters, materialize_lazy
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.report import ConsoleProgress, MetricsCSV, make_console, say, summary_table, write_json

log = logging.getLogger("shelltrain")


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Run one job in `run_dir`; returns the best monitored validation metric (for sweepers)."""
    started = time.perf_counter()
    console = make_console()
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)

    data = build_data(cfg.data, cfg.augmentation, seed=cfg.trainer.seed, pin_memory=device.type == "cuda")
    settings = train_settings(cfg.trainer, device)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    say(
        console,
        f"{cfg.data.name}: {len(data.train.dataset)} train / {len(data.val.dataset)} val / "
        f"{len(data.test.dataset)} test images, {data.num_classes} classes",
    )

    if uses_ensemble(cfg):  # members trained here (through train_model), loaded, or from a sweep, then fused
        train_member = functools.partial(train_model, data=data, device=device, console=console)
        fused = run_ensemble(cfg, data, settings, train_member, run_dir, console)
        test, figures = fused.test, fused.figures()
        best_metric: float | None = fused.val[settings.monitor.removeprefix("val_")]
    else:
        model, state = train_model(cfg, run_dir, data=data, device=device, console=console)
        test = evaluate(model, data.test, settings, limit=cfg.trainer.limit_test_batches)
        best_row = state.history[state.best_epoch - 1] if state.best_epoch else {}
        figures = {
            "best_val_acc": best_row.get("val_acc"),
            "best_val_loss": best_row.get("val_loss"),
            "best_epoch": state.best_epoch,
            "epochs_completed": state.epoch,
            "stopped_early": state.stopped_early,
            "params": count_parameters(model),
        }
        best_metric = state.best_metric

    summary: dict[str, Any] = {
        "status": "completed",
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        **figures,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "run_dir": str(run_dir),
    }
    write_json(summary, run_dir / "summary.json")
    console.print(summary_table(summary))
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    return best_metric if best_metric is not None else test["acc"]


def train_model(
    cfg: DictConfig,
    out_dir: Path,
    *,
    data: DataBundle,
    device: torch.device,
    console: Console,
    label: str = "",
    model: nn.Module | None = None,
) -> tuple[nn.Module, TrainState]:
    """The pipeline for one model (the run's own, or an ensemble member): build it (or start from
    `model`), train it with checkpoints/ and metrics.csv in `out_dir`, and reload its best.pt."""
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
    if model is None and cfg.model.get("weights"):
        model = load_model(cfg.model.weights, data.in_channels, data.classes)[0]
    if model is None:
        model = build_model(cfg.model, data.num_classes, data.in_channels)
        materialize_lazy(model, next(iter(data.val))[0][:2])
    settings = train_settings(cfg.trainer, device)
    optimizer = build_optimizer(cfg.optimizer, model)
    steps_per_epoch = _steps_per_epoch(len(data.train), settings)
    schedule = build_scheduler(
        cfg.scheduler, optimizer, settings.epochs, steps_per_epoch, monitor_mode(settings.monitor)
    )
    scaler = make_scaler(settings)
    name = cfg.model.get("name", cfg.model.get("_target_"))
    say(console, f"{label + ': ' if label else ''}model {name} ({count_parameters(model):,} parameters) on {device}")

    checkpoints = out_dir / "checkpoints"
    checkpointer = Checkpointer(
        checkpoints, model, optimizer, schedule, scaler,
        extra={"config": OmegaConf.to_container(cfg, resolve=True), "classes": data.classes},
    )  # fmt: skip
    metrics = MetricsCSV(out_dir / "metrics.csv")
    state = fit(
        model, data.train, data.val, optimizer, schedule, settings,
        callbacks=[ConsoleProgress(console, settings.epochs, label), checkpointer, _MetricsWriter(metrics)],
        scaler=scaler,
    )  # fmt: skip
    if state.epoch > 0:
        model.load_state_dict(load_checkpoint(checkpoints / "best.pt")["model"])
    return model, state


class _MetricsWriter(Callback):
    def __init__(self, metrics: MetricsCSV):
        self.metrics = metrics

    def on_epoch_end(self, state: Any, row: dict[str, float], improved: bool) -> None:
        self.metrics.append(row)


def train_settings(trainer: DictConfig, device: torch.device) -> TrainSettings:
    return TrainSettings(
        epochs=trainer.epochs,
        device=device,
        precision=str(trainer.precision),
        channels_last=trainer.channels_last,
        grad_clip=trainer.grad_clip,
        accumulate=trainer.accumulate,
        seed=trainer.seed,
        loss=trainer.loss,
        label_smoothing=trainer.label_smoothing,
        l1=trainer.l1,
        monitor=trainer.monitor,
        patience=trainer.patience,
        limit_train_batches=trainer.limit_train_batches,
        limit_val_batches=trainer.limit_val_batches,
        overfit_batches=trainer.overfit_batches,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool, threads: int | None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fastest kernels for fixed input shapes


def _steps_per_epoch(num_batches: int, settings: TrainSettings) -> int:
    limit = settings.overfit_batches or settings.limit_train_batches
    batches = min(num_batches, limit) if limit else num_batches
    return -(-batches // settings.accumulate)
