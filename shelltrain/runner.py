"""The pipeline, in order: data -> model -> optimizer -> train -> (prune) -> (ensemble) -> test -> report.

This is the only module that knows the order; each stage is a plain function from its own module.
"""

from __future__ import annotations

import copy
import json
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
from shelltrain.data import DataBundle, build_data, cv_fold
from shelltrain.engine import Callback, TrainSettings, TrainState, fit, make_scaler, monitor_mode, predict
from shelltrain.errors import UserError
from shelltrain.loggers import build_loggers
from shelltrain.metrics import confusion_matrix, per_class_metrics, split_metrics
from shelltrain.models import build_model, count_parameters, materialize_lazy
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.plots import write_run_plots
from shelltrain.prune import PruneResult, eval_settings, preflight, prune_model, summary_keys
from shelltrain.quantize import quiet
from shelltrain.report import ConsoleProgress, make_console, say, summary_table, write_json
from shelltrain.transfer import follow_weights, load_weights, make_policy, open_weights, transfer_log, transfer_summary

log = logging.getLogger("shelltrain")


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Run one job in `run_dir`; returns the value sweeps select by: the best monitored validation metric,
    or its cross-validated mean when `cv.folds` is set."""
    if cfg.task != "train":  # evaluate, predict or export a trained model
        from shelltrain.tasks import run_task

        device = resolve_device(cfg.trainer.device)
        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
        return run_task(cfg, run_dir, train_settings(cfg.trainer, device), make_console())
    cv = cfg.get("cv")
    if cv is not None and cv.folds:
        return cross_validate(cfg, run_dir)
    return train_and_test(cfg, run_dir)


def train_and_test(cfg: DictConfig, run_dir: Path, fold: tuple[int, int] | None = None) -> float:
    """The pipeline once, in `run_dir`; `fold=(k, K)` trains on the other folds of the train split and
    validates on fold k (a cross-validation sub-run)."""
    started = time.perf_counter()
    console = make_console()
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)

    weights = open_weights(cfg.model)  # None for a random start
    data_cfg, stats, stats_from = follow_weights(cfg.data, weights)
    data = build_data(data_cfg, cfg.augmentation, cfg.trainer.seed, device.type == "cuda", stats)
    if fold is not None:
        data = cv_fold(data, folds=fold[1], fold=fold[0], seed=cfg.data.split_seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    example = next(iter(data.val))[0][:2]
    materialize_lazy(model, example)
    strict = cfg.model.get("strict", False)
    model, loaded = load_weights(model, weights, strict=strict, classes=data.classes, example_inputs=example)
    if cfg.prune.name != "none":
        preflight(cfg.prune, model, example, arch=cfg.model.get("name"))
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
    config = OmegaConf.to_container(cfg, resolve=True)
    preprocessing = {
        "mean": list(data.mean), "std": list(data.std), "image_size": data.image_size, "channels": data.in_channels,
    }  # fmt: skip
    extra = {"config": config, "classes": data.classes, "preprocessing": preprocessing}
    checkpointer = Checkpointer(checkpoints, model, optimizer, schedule, scaler, extra=extra)
    loggers = build_loggers(cfg.get("logger"), run_dir)
    loggers.start(config)
    state = fit(
        model, data.train, data.val, optimizer, schedule, settings,
        callbacks=[
            *([policy] if policy else []),  # freezes and unfreezes at epoch starts
            ConsoleProgress(console, settings.epochs), checkpointer, loggers,
        ],
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
    logits, targets = predict(model, data.test, settings, limit=cfg.trainer.limit_test_batches)
    confusion = confusion_matrix(logits, targets, data.num_classes)

    best_row = state.history[state.best_epoch - 1] if state.best_epoch else {}
    summary: dict[str, Any] = {
        "status": "completed",
        **split_metrics(logits, targets, settings, "test"),
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
        "per_class": per_class_metrics(confusion, data.classes),
    }
    if weights is not None or policy is not None:
        summary["transfer"] = transfer_summary(model, loaded, data, stats_from, policy, cfg.optimizer.lr)
    if pruned is not None:
        summary.update(summary_keys(pruned.report))
        summary["prune"] = pruned.report
    write_json(summary, run_dir / "summary.json")
    loggers.finish(summary)
    write_run_plots(run_dir, state.history, confusion, data.classes, state.best_epoch)
    console.print(summary_table(summary))
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    return state.best_metric if state.best_metric is not None else summary["test_acc"]


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


def cross_validate(cfg: DictConfig, run_dir: Path) -> float:
    """Stratified K-fold on the train split: one sub-run per fold in run_dir/cv/fold_<k>, scored on its held-out
    fold; then (cv.refit) the final model on the whole train split in run_dir. Returns the mean fold score."""
    started = time.perf_counter()
    console = make_console()
    folds, monitor = int(cfg.cv.folds), str(cfg.trainer.monitor)
    fold_summaries = []
    for k in range(folds):
        say(console, f"[bold]cross-validation: fold {k + 1}/{folds}[/bold]")
        fold_dir = run_dir / "cv" / f"fold_{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        train_and_test(cfg, fold_dir, fold=(k, folds))
        fold_summaries.append(json.loads((fold_dir / "summary.json").read_text()))
    scores = [float(s[f"best_{monitor}"]) for s in fold_summaries]
    tests = [float(s["test_acc"]) for s in fold_summaries]
    section: dict[str, Any] = {
        "folds": folds,
        "metric": f"best_{monitor}",  # each fold's best epoch, measured on its held-out fold
        "scores": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),  # population std (numpy's default), as in scikit-learn's examples
        "test_acc": tests,
        "test_acc_mean": float(np.mean(tests)),
        "test_acc_std": float(np.std(tests)),
        "splitter": f"StratifiedKFold(n_splits={folds}, shuffle=True, random_state=data.split_seed)",
        "fold_dirs": [f"cv/fold_{k}" for k in range(folds)],
        "refit": bool(cfg.cv.refit),
    }
    console.print(cv_table(section, monitor))
    say(console, f"cv {monitor}: {section['mean']:.4f} ± {section['std']:.4f} over {folds} folds")

    if cfg.cv.refit:
        say(console, "[bold]cross-validation: final model on the whole train split[/bold]")
        train_and_test(cfg, run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        summary = {
            "status": "completed",
            "test_acc": section["test_acc_mean"],  # no final model: the fold models' mean on the test split
            "test_loss": float(np.mean([s["test_loss"] for s in fold_summaries])),
            "params": fold_summaries[0]["params"],
            "device": fold_summaries[0]["device"],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "run_dir": str(run_dir),
        }
    summary["cv"] = section
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_json(summary, run_dir / "summary.json")
    say(console, f"cv {monitor}: {section['mean']:.4f} ± {section['std']:.4f} over {folds} folds (summary.json cv)")
    return section["mean"]


def cv_table(section: dict[str, Any], monitor: str) -> Any:
    from rich.table import Table

    table = Table(title="cross-validation", show_header=True)
    table.add_column("fold", justify="right")
    table.add_column(f"best {monitor} (held-out fold)", justify="right")
    table.add_column("test_acc", justify="right")
    for k, (score, test) in enumerate(zip(section["scores"], section["test_acc"])):
        table.add_row(str(k), f"{score:.4f}", f"{test:.4f}")
    table.add_row("mean ± std", f"{section['mean']:.4f} ± {section['std']:.4f}",
                  f"{section['test_acc_mean']:.4f} ± {section['test_acc_std']:.4f}", style="bold")  # fmt: skip
    return table


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
