"""Pruning as a step of the pipeline: prune the trained model, fine-tune it with the engine (a fresh optimizer
and schedule from the run's config), and leave the pruned model as the run's best.pt and last.pt."""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from shelltrain import rundir
from shelltrain.checkpoint import checkpoint_payload, save_checkpoint, serialize
from shelltrain.console import say
from shelltrain.data import DataBundle
from shelltrain.distill import Distiller
from shelltrain.engine import Callback, NonFiniteLoss, TrainState, fit, monitor_mode
from shelltrain.errors import UserError
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.placement import place
from shelltrain.progress import ConsoleProgress
from shelltrain.prune import PruneResult, prune_model
from shelltrain.prune.report import chain_reports
from shelltrain.rng import rng_state
from shelltrain.schema import TrainerConfig
from shelltrain.schema_values import PRUNE_SCHEDULES
from shelltrain.silence import quiet


def prune_stage(
    cfg: DictConfig,
    model: torch.nn.Module,
    data: DataBundle,
    settings: TrainerConfig,
    state: TrainState,
    run_dir: Path,
    extra: dict[str, Any],
    console: Any,
) -> PruneResult:
    """Prune and fine-tune the trained model; best.pt and last.pt then hold the pruned model.

    The trained model's checkpoint stays as checkpoints/unpruned.pt. Pruned checkpoints carry no optimizer
    state (the pruned model has other parameters); their "pruning" entry rebuilds the architecture.
    """
    finetune = finetuner(cfg, data, settings, console, teacher=copy.deepcopy(model) if cfg.prune.distill else None)
    reports = []
    for step in [cfg.prune.name, *(cfg.prune.then or [])]:  # each compression step on the previous result
        result = prune_model(
            step_config(cfg.prune, step),
            model,
            data,
            settings,
            finetune,
            arch=cfg.model.get("name"),
            test_limit=cfg.trainer.limit_test_batches,
            say=lambda m: say(console, m),
        )
        model = result.model
        reports.append(result.report)
    if len(reports) > 1:
        method = "+".join(r["method"] for r in reports)
        result = PruneResult(model, chain_reports(reports), {**result.checkpoint, "method": method})
    if rundir.best_checkpoint(run_dir).exists():
        os.replace(rundir.best_checkpoint(run_dir), rundir.checkpoint(run_dir, rundir.UNPRUNED))
    payload = checkpoint_payload(result.model.state_dict(), state, rng_state(), {**extra, "pruning": result.checkpoint})
    with quiet():  # quantized tensors warn when serialized
        data = serialize(payload)  # best.pt and last.pt hold the same checkpoint: serialized once
    for path in (rundir.best_checkpoint(run_dir), rundir.last_checkpoint(run_dir)):
        save_checkpoint(data, path)
    result.report["after"]["checkpoint_bytes"] = rundir.best_checkpoint(run_dir).stat().st_size
    return result


def step_config(prune: DictConfig, name: str) -> DictConfig:
    """The prune group for one step of a sequence: this group's keys with `name`, and its schedule where the
    method supports it (else the method's own, e.g. quantize: oneshot)."""
    schedules = PRUNE_SCHEDULES[name]
    schedule = prune.schedule
    return OmegaConf.merge(prune, {"name": name, "schedule": schedule if schedule in schedules else schedules[0]})


def finetuner(
    cfg: DictConfig, data: DataBundle, settings: TrainerConfig, console: Any, teacher: torch.nn.Module | None = None
) -> Any:
    """The fine-tune function pruning calls: the engine's fit with a fresh optimizer and schedule built from
    cfg.optimizer and cfg.scheduler, the learning rate scaled by prune.finetune_lr_mult. With `teacher`
    (prune.distill: the unpruned model) every round recovers by distillation from it (prune.distill_temperature,
    prune.distill_alpha)."""
    loss = None
    if teacher is not None:
        place(teacher, settings)
        loss = Distiller(teacher, float(cfg.prune.distill_temperature), float(cfg.prune.distill_alpha))

    def finetune(model: torch.nn.Module, epochs: int, callbacks: list[Callback], label: str) -> TrainState:
        scaled = copy.deepcopy(cfg)  # the scheduler's ${optimizer.lr} and ${trainer.epochs} follow the fine-tune's
        scaled.optimizer.lr = cfg.optimizer.lr * cfg.prune.finetune_lr_mult
        scaled.trainer.epochs = epochs  # (cosine's T_max: the fine-tune's epochs, not the training run's, maybe 0)
        run = replace(settings, epochs=epochs)
        place(model, run)  # before the optimizer, as in the runner's build
        optimizer = build_optimizer(scaled.optimizer, model)
        schedule = build_scheduler(
            scaled.scheduler, optimizer, epochs, steps_per_epoch(len(data.train), run), monitor_mode(run.monitor)
        )
        callbacks = [ConsoleProgress(console, epochs, label=label), *callbacks]
        try:
            return fit(model, data.train, data.val, optimizer, schedule, run, callbacks=callbacks, loss=loss)
        except NonFiniteLoss as exc:  # the fine-tune's own rate is the first thing to lower, not optimizer.lr
            raise UserError(
                f"prune fine-tune ({label}): {exc}; it trains at optimizer.lr x prune.finetune_lr_mult = "
                f"{scaled.optimizer.lr:g}: lower prune.finetune_lr_mult (now {cfg.prune.finetune_lr_mult}) or set "
                "trainer.grad_clip=1.0; the trained model is kept in checkpoints/best.pt"
            ) from None

    return finetune


def steps_per_epoch(num_batches: int, settings: TrainerConfig) -> int:
    """Optimizer steps in an epoch of `num_batches` batches (what a per-step schedule is sized by)."""
    limit = settings.overfit_batches or settings.limit_train_batches
    batches = min(num_batches, limit) if limit else num_batches
    return -(-batches // settings.accumulate)
