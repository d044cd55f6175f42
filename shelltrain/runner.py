"""The pipeline, in order: data -> model -> optimizer -> train -> (prune) -> (ensemble) -> test -> report.

This is the only module that knows the order; each stage is a plain function from its own module.
"""

from __future__ import annotations

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

from shelltrain.checkpoint import Checkpointer, load_checkpoint
from shelltrain.data import build_data
from shelltrain.engine import Callback, TrainSettings, evaluate, fit, make_scaler, monitor_mode
from shelltrain.errors import UserError
from shelltrain.models import build_model, count_parameters, materialize_lazy
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.report import ConsoleProgress, MetricsCSV, make_console, say, summary_table, write_json
from shelltrain.transfer import follow_weights, load_weights, make_policy, open_weights, transfer_log, transfer_summary

log = logging.getLogger("shelltrain")


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Run one job in `run_dir`; returns the best monitored validation metric (for sweepers)."""
    started = time.perf_counter()
    console = make_console()
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)

    weights = open_weights(cfg.model)  # None for a random start
    data_cfg, stats, stats_from = follow_weights(cfg.data, weights)
    data = build_data(data_cfg, cfg.augmentation, cfg.trainer.seed, device.type == "cuda", stats)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    example = next(iter(data.val))[0][:2]
    materialize_lazy(model, example)
    strict = cfg.model.get("strict", False)
    model, loaded = load_weights(model, weights, strict=strict, classes=data.classes, example_inputs=example)
    policy = make_policy(model, cfg.get("finetune"), notify=lambda line: say(console, line))
    settings = train_settings(cfg.trainer, device)
    optimizer = build_optimizer(cfg.optimizer, model, policy.param_groups() if policy else None)
    steps_per_epoch = _steps_per_epoch(len(data.train), settings)
    schedule = build_scheduler(
        cfg.scheduler, optimizer, settings.epochs, steps_per_epoch, monitor_mode(settings.monitor)
    )
    scaler = make_scaler(settings)
    params = count_parameters(model)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    say(
        console,
        f"{cfg.data.name}: {len(data.train.dataset)} train / {len(data.val.dataset)} val / "
        f"{len(data.test.dataset)} test images, {data.num_classes} classes; "
        f"model {cfg.model.get('name', cfg.model.get('_target_'))} ({params:,} parameters) on {device}",
    )
    for line in transfer_log(weights, loaded, data_cfg, stats_from, policy):
        say(console, line)

    checkpoints = run_dir / "checkpoints"
    checkpointer = Checkpointer(
        checkpoints, model, optimizer, schedule, scaler,
        extra={
            "config": OmegaConf.to_container(cfg, resolve=True),
            "classes": data.classes,
            "preprocessing": {"mean": list(data.mean), "std": list(data.std), "image_size": data.image_size},
        },
    )  # fmt: skip
    metrics = MetricsCSV(run_dir / "metrics.csv")
    state = fit(
        model, data.train, data.val, optimizer, schedule, settings,
        callbacks=[
            *([policy] if policy else []),  # freezes and unfreezes at epoch starts
            ConsoleProgress(console, settings.epochs), checkpointer, _MetricsWriter(metrics),
        ],
        scaler=scaler,
    )  # fmt: skip

    if state.epoch > 0:
        model.load_state_dict(load_checkpoint(checkpoints / "best.pt")["model"])
    test = evaluate(model, data.test, settings, limit=cfg.trainer.limit_test_batches)

    best_row = state.history[state.best_epoch - 1] if state.best_epoch else {}
    summary: dict[str, Any] = {
        "status": "completed",
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "best_val_acc": best_row.get("val_acc"),
        "best_val_loss": best_row.get("val_loss"),
        "best_epoch": state.best_epoch,
        "epochs_completed": state.epoch,
        "stopped_early": state.stopped_early,
        "params": params,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "run_dir": str(run_dir),
    }
    if weights is not None or policy is not None:
        summary["transfer"] = transfer_summary(model, loaded, data, stats_from, policy, cfg.optimizer.lr)
    write_json(summary, run_dir / "summary.json")
    console.print(summary_table(summary))
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    return state.best_metric if state.best_metric is not None else test["acc"]


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
