"""The pipeline, in order: data -> model -> optimizer -> train -> (prune) -> (ensemble) -> test -> report.

This is the only module that knows the order; each stage is a plain function from its own module.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

from shelltrain.checkpoint import Checkpointer, load_checkpoint, rng_state, save_checkpoint
from shelltrain.data import DataBundle, build_data
from shelltrain.engine import Callback, TrainSettings, TrainState, evaluate, fit, make_scaler, monitor_mode
from shelltrain.errors import UserError
from shelltrain.models import build_model, count_parameters, materialize_lazy
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.prune import PruneResult, eval_settings, preflight, prune_model, summary_keys
from shelltrain.quantize import quiet
from shelltrain.report import ConsoleProgress, MetricsCSV, make_console, say, summary_table, write_json

log = logging.getLogger("shelltrain")


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Run one job in `run_dir`; returns the best monitored validation metric (for sweepers)."""
    started = time.perf_counter()
    console = make_console()
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)

    data = build_data(cfg.data, cfg.augmentation, seed=cfg.trainer.seed, pin_memory=device.type == "cuda")
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    example = next(iter(data.val))[0][:2]
    materialize_lazy(model, example)
    if cfg.prune.name != "none":
        preflight(cfg.prune, model, example, arch=cfg.model.get("name"))
    settings = train_settings(cfg.trainer, device)
    optimizer = build_optimizer(cfg.optimizer, model)
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

    checkpoints = run_dir / "checkpoints"
    extra = {"config": OmegaConf.to_container(cfg, resolve=True), "classes": data.classes}
    checkpointer = Checkpointer(checkpoints, model, optimizer, schedule, scaler, extra=extra)
    metrics = MetricsCSV(run_dir / "metrics.csv")
    state = fit(
        model, data.train, data.val, optimizer, schedule, settings,
        callbacks=[ConsoleProgress(console, settings.epochs), checkpointer, _MetricsWriter(metrics)],
        scaler=scaler,
    )  # fmt: skip

    if state.epoch > 0:
        model.load_state_dict(load_checkpoint(checkpoints / "best.pt")["model"])
    pruned = None
    if cfg.prune.name != "none":
        pruned = prune_stage(cfg, model, data, settings, state, checkpoints, extra, console)
        model = pruned.model
        settings = eval_settings(model, settings)  # int8 models run on the CPU
        write_json(pruned.report, run_dir / "prune.json")
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
    if pruned is not None:
        summary.update(summary_keys(pruned.report))
        summary["prune"] = pruned.report
    write_json(summary, run_dir / "summary.json")
    console.print(summary_table(summary))
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    return state.best_metric if state.best_metric is not None else test["acc"]


def prune_stage(
    cfg: DictConfig,
    model: torch.nn.Module,
    data: DataBundle,
    settings: TrainSettings,
    state: TrainState,
    checkpoints: Path,
    extra: dict[str, Any],
    console: Any,
) -> PruneResult:
    """Prune and fine-tune the trained model; best.pt and last.pt then hold the pruned model.

    The trained model's checkpoint stays as checkpoints/unpruned.pt. Pruned checkpoints carry no optimizer
    state (the pruned model has other parameters); their "pruning" entry rebuilds the architecture.
    """
    result = prune_model(
        cfg.prune, model, data, settings, finetuner(cfg, data, settings, console),
        arch=cfg.model.get("name"), test_limit=cfg.trainer.limit_test_batches, say=lambda m: say(console, m),
    )  # fmt: skip
    if (checkpoints / "best.pt").exists():
        os.replace(checkpoints / "best.pt", checkpoints / "unpruned.pt")
    payload = {
        "model": result.model.state_dict(),
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "epoch": state.epoch,
        "step": state.step,
        "train_state": asdict(state),
        "metrics": state.history[-1] if state.history else {},
        "rng": rng_state(),
        **extra,
        "pruning": result.checkpoint,
    }
    with quiet():  # quantized tensors warn when serialized
        for name in ("best.pt", "last.pt"):
            save_checkpoint(payload, checkpoints / name)
    result.report["after"]["checkpoint_bytes"] = (checkpoints / "best.pt").stat().st_size
    return result


def finetuner(cfg: DictConfig, data: DataBundle, settings: TrainSettings, console: Any) -> Any:
    """The fine-tune function pruning calls: the engine's fit with a fresh optimizer and schedule built from
    cfg.optimizer and cfg.scheduler, the learning rate scaled by prune.finetune_lr_mult."""

    def finetune(model: torch.nn.Module, epochs: int, callbacks: list[Callback], label: str) -> TrainState:
        scaled = copy.deepcopy(cfg)  # the scheduler's ${optimizer.lr} follows the scaled rate
        scaled.optimizer.lr = cfg.optimizer.lr * cfg.prune.get("finetune_lr_mult", 1.0)
        optimizer = build_optimizer(scaled.optimizer, model)
        run = replace(settings, epochs=epochs)
        schedule = build_scheduler(
            scaled.scheduler, optimizer, epochs, _steps_per_epoch(len(data.train), run), monitor_mode(run.monitor)
        )
        progress = ConsoleProgress(console, epochs, label=label)
        return fit(model, data.train, data.val, optimizer, schedule, run, callbacks=[progress, *callbacks])

    return finetune


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
