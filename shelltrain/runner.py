"""The pipeline, in order: data -> model -> optimizer -> train -> (prune) -> (ensemble) -> test -> report.

This is the only module that knows the order; each stage is a plain function from its own module.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from shelltrain import distributed
from shelltrain.checkpoint import (
    Checkpointer,
    Resume,
    load_checkpoint,
    restore_training,
    rng_state,
    save_checkpoint,
)
from shelltrain.data import DataBundle, build_data, cv_fold
from shelltrain.engine import (
    SYNC_EVERY,
    Callback,
    NonFiniteLoss,
    TrainState,
    fit,
    make_scaler,
    monitor_mode,
    predict,
)
from shelltrain.errors import Interrupted, UserError
from shelltrain.finetune import make_policy, transfer_log, transfer_summary
from shelltrain.loggers import build_loggers
from shelltrain.metrics import confusion_matrix, per_class_metrics, split_metrics
from shelltrain.models import build_model, count_parameters, materialize_lazy
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.plots import plot_members, write_run_plots
from shelltrain.prune import PruneResult, preflight, prune_model
from shelltrain.prune.quantize import eval_settings, quiet
from shelltrain.prune.report import summary_keys, write_report
from shelltrain.report import ConsoleProgress, make_console, say, summary_table
from shelltrain.rundir import BEST, DISK_FULL, LAST, NOT_WRITABLE, disk_error, write_atomic, write_json
from shelltrain.schema import TrainerConfig, trainer_config, uses_ensemble
from shelltrain.transfer import follow_weights, load_weights, open_weights

log = logging.getLogger("shelltrain")


def run(
    cfg: DictConfig, run_dir: Path, resume: Resume | None = None, overrides: list[str] | None = None
) -> float | None:
    """Run one job in `run_dir`; returns the value sweeps select by: the best monitored validation metric,
    or its cross-validated mean when `cv.folds` is set.

    `overrides` (the command line's, stored in every checkpoint) let `trainer.resume` rebuild the config."""
    if distributed.active():
        _check_distributable(cfg)
    if cfg.task != "train":  # evaluate, predict or export a trained model
        from shelltrain.tasks import run_task

        device = resolve_device(cfg.trainer.device)
        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
        return run_task(cfg, run_dir, train_settings(cfg.trainer, device), make_console())
    try:
        if uses_ensemble(cfg):  # members (sub-runs or loaded models) fused into one prediction
            return ensemble_and_test(cfg, run_dir, resume=resume is not None)
        cv = cfg.get("cv")
        if cv is not None and cv.folds:
            if resume is not None:
                raise UserError("trainer.resume does not apply to cross-validation (cv.folds): run it again anew")
            return cross_validate(cfg, run_dir)
        return train_and_test(cfg, run_dir, resume=resume, overrides=overrides or [])
    except OSError as exc:  # writing the run's files: a full disk or a read-only place is the user's to fix
        inside = exc.filename is not None and Path(str(exc.filename)).absolute().is_relative_to(run_dir.absolute())
        if exc.errno in DISK_FULL or (exc.errno in NOT_WRITABLE and inside):
            raise UserError(f"cannot write '{exc.filename or run_dir}': {disk_error(exc, run_dir)}") from exc
        raise


def train_and_test(
    cfg: DictConfig,
    run_dir: Path,
    fold: tuple[int, int] | None = None,
    resume: Resume | None = None,
    overrides: list[str] | None = None,
    label: str = "",
) -> float:
    """The pipeline once, in `run_dir`; `fold=(k, K)` trains on the other folds of the train split and
    validates on fold k (a cross-validation sub-run); `resume` continues from a checkpoint; `label` names
    a sub-run (an ensemble member) in the progress display."""
    started = time.perf_counter()
    console = make_console(quiet=not distributed.is_main())
    checkpoints = run_dir / "checkpoints"
    payload = (resume.payload or load_checkpoint(resume.checkpoint)) if resume else None  # None without resume
    if resume is None and (checkpoints / LAST).exists():
        raise UserError(
            f"run directory '{run_dir}' already holds a run (checkpoints/{LAST}); continue it with "
            f"trainer.resume={run_dir} (or trainer.resume=auto), or choose a new hydra.run.dir"
        )
    if payload is not None and resume.in_place:
        finished = _finished_result(payload, cfg, run_dir)
        if finished is not None:
            say(
                console,
                f"run directory [bold]{run_dir}[/bold] already finished its {cfg.trainer.epochs} epochs; "
                "nothing to resume (its summary.json is unchanged)",
            )
            return finished

    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)

    weights = open_weights(cfg.model)  # None for a random start
    data_cfg, stats, stats_from = follow_weights(cfg.data, weights)
    if cfg.trainer.compile and not data_cfg.drop_last:
        data_cfg = OmegaConf.merge(data_cfg, {"drop_last": True})  # a smaller last batch would recompile
        say(console, "trainer.compile: the last incomplete train batch of each epoch is dropped (data.drop_last)")
    data = build_data(data_cfg, cfg.augmentation, cfg.trainer.seed, device.type == "cuda", stats, device=device)
    if fold is not None:
        data = cv_fold(data, folds=fold[1], fold=fold[0], seed=cfg.data.split_seed)
    for loader in (data.train, data.val, data.test):
        if isinstance(loader, DataLoader):
            loader.worker_init_fn = functools.partial(_leave_stop_signals_to_main, loader.worker_init_fn)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    example = next(iter(data.test))[0][:2].cpu()
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
    state = TrainState()
    if payload is not None:
        state = restore_training(payload, resume.checkpoint, model, optimizer, schedule, scaler)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    processes = f" in {distributed.world_size()} processes (DDP)" if distributed.active() else ""
    say(
        console,
        f"{cfg.data.name}: {len(data.train.dataset)} train / {len(data.val.dataset)} val / "
        f"{len(data.test.dataset)} test images, {data.num_classes} classes; "
        f"model {cfg.model.get('name', cfg.model.get('_target_'))} ({params:,} parameters) on {device}{processes}",
    )
    for line in transfer_log(weights, loaded, data_cfg, stats_from, policy):
        say(console, line)

    config = OmegaConf.to_container(cfg, resolve=True)
    preprocessing = {
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": data.image_size,
        "channels": data.in_channels,
    }
    extra = {"config": config, "classes": data.classes, "preprocessing": preprocessing, "overrides": overrides or []}
    if weights is not None and "pruning" in (weights.checkpoint or {}):  # trained further, it still needs rebuilding
        extra["pruning"] = weights.checkpoint["pruning"]
    main = distributed.is_main()  # under DDP only rank 0 writes files and prints
    loggers = build_loggers(cfg.get("logger") if main else None, run_dir)
    if payload is not None:
        _announce_resume(console, cfg, payload, resume, state, run_dir)
        loggers.resume(state.history)  # exactly the checkpoint's rows: none missing, none repeated
        if not resume.in_place and main:
            _seed_new_run_dir(resume.checkpoint, payload, state, checkpoints)
    loggers.start(config)
    checkpointer = Checkpointer(
        checkpoints,
        model,
        optimizer,
        schedule,
        scaler,
        extra=extra,
        monitor=settings.monitor,
        keep=cfg.trainer.keep_checkpoints,
        write=main,
    )
    stop = GracefulStop(run_dir)
    try:
        with stop:
            state = fit(
                model,
                data.train,
                data.val,
                optimizer,
                schedule,
                settings,
                state=state,
                callbacks=[
                    *([policy] if policy else []),  # freezes and unfreezes at epoch starts
                    ConsoleProgress(console, settings.epochs, label),
                    checkpointer,
                    loggers,
                ],
                scaler=scaler,
                stop=stop,
                rng=_rng_of_this_rank(payload, state),
            )
    except NonFiniteLoss as exc:
        message = _non_finite_message(exc, cfg, checkpoints)
        if (checkpoints / LAST).exists() and main:
            _write_summary(run_dir, {"status": "failed", "error": message, "epochs_completed": exc.epoch - 1})
        raise UserError(message) from None
    if stop.requested or stop.signum is not None:
        signum = stop.signum or signal.SIGTERM  # under DDP another rank may have received it
        if main:
            _write_summary(
                run_dir,
                {
                    "status": "interrupted",
                    "signal": signal.Signals(signum).name,
                    "epochs_completed": state.epoch,
                    "step": state.step,
                    "batches_into_next_epoch": state.batch,
                    "run_dir": str(run_dir),
                },
            )
        raise Interrupted(signum, run_dir)
    if not main:
        return math.nan  # rank 0 tests the model and writes the report

    if state.epoch > 0 and (checkpoints / BEST).exists():
        model.load_state_dict(load_checkpoint(checkpoints / BEST)["model"])
    pruned = None
    if cfg.prune.name != "none":
        pruned = prune_stage(cfg, model, data, settings, state, checkpoints, extra, console)
        model = pruned.model
        settings = eval_settings(model, settings)  # int8 models run on the CPU
        write_report(pruned.report, run_dir, cfg.get("plots", True))
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
        "processes": distributed.world_size(),
        **_provenance(device, run_dir),
        "per_class": per_class_metrics(confusion, data.classes),
    }
    if weights is not None or policy is not None:
        summary["transfer"] = transfer_summary(model, loaded, data, stats_from, policy, cfg.optimizer.lr)
    if pruned is not None:
        summary.update(summary_keys(pruned.report))
        summary["prune"] = pruned.report
    if resume is not None:
        summary["resumed_from"] = str(resume.checkpoint)
    write_json(summary, run_dir / "summary.json")
    loggers.finish(summary)
    if cfg.get("plots", True):
        write_run_plots(run_dir, state.history, confusion, data.classes, state.best_epoch)
    console.print(summary_table(summary))
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    return state.best_metric if state.best_metric is not None else summary["test_acc"]


def ensemble_and_test(cfg: DictConfig, run_dir: Path, resume: bool = False) -> float:
    """An ensemble run: members trained here are complete sub-runs in run_dir/members/<i> (like cv folds),
    loaded members come from checkpoints, ensemble runs or a sweep; all are fused and tested on this run's data.
    `resume` continues one that was interrupted. Returns the ensemble's validation metric (what sweeps select by)."""
    from shelltrain.ensemble import run_ensemble

    started = time.perf_counter()
    console = make_console()
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
    data = build_data(cfg.data, cfg.augmentation, cfg.trainer.seed, device.type == "cuda")
    settings = train_settings(cfg.trainer, device)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    say(
        console,
        f"{cfg.data.name}: {len(data.train.dataset)} train / {len(data.val.dataset)} val / "
        f"{len(data.test.dataset)} test images, {data.num_classes} classes",
    )
    loggers = build_loggers(cfg.get("logger"), run_dir)
    loggers.start(OmegaConf.to_container(cfg, resolve=True))

    def train_member(member_cfg: DictConfig, member_dir: Path, label: str, continued: Resume | None) -> None:
        try:
            train_and_test(member_cfg, member_dir, label=label, resume=continued)
        except Interrupted as exc:  # the ensemble resumes as a whole, from its own run directory
            raise Interrupted(exc.signum, run_dir, exc.saved) from exc

    fused = run_ensemble(cfg, data, settings, train_member, run_dir, console, resume)
    summary: dict[str, Any] = {
        "status": "completed",
        "test_acc": fused.test["acc"],
        "test_loss": fused.test["loss"],
        **fused.figures(),
        "wall_seconds": round(time.perf_counter() - started, 3),
        **_provenance(device, run_dir),
        "per_class": per_class_metrics(fused.confusion, data.classes),
    }
    write_json(summary, run_dir / "summary.json")
    loggers.finish(summary)
    if cfg.get("plots", True):
        write_run_plots(run_dir, [], fused.confusion, data.classes)
        rows = [{"name": f"{m['index']}: {m['model']}", "test_acc": m["test_acc"]} for m in fused.report["members"]]
        plot_members(
            [*rows, {"name": f"ensemble ({fused.report['rule']})", "test_acc": fused.test["acc"]}],
            run_dir / "plots" / "members.png",
        )
    console.print(summary_table(summary))
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    value = fused.val[settings.monitor.removeprefix("val_")]
    return fused.test["acc"] if math.isnan(value) else value


class GracefulStop:
    """While training, the first SIGINT or SIGTERM asks the engine to stop after the current step (it
    then writes a resumable checkpoint); a second one interrupts at once. Called, it says whether a
    stop was asked for; `signum` is the signal.

    Under DDP every rank must stop after the same step, so the ranks agree every SYNC_EVERY polls (the
    engine polls after every optimizer step, on every rank alike) whether any of them was asked to stop.
    A second signal does not cut a rank short there: torchrun forwards a terminal's Ctrl-C as SIGTERM on
    top of the SIGINT every rank already got, and kills the ranks itself after its own timeout."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.signum: int | None = None
        self.requested = False  # a stop was asked for (on any rank, under DDP) and the engine was told
        self._polls = 0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __call__(self) -> bool:
        if not distributed.active():
            self.requested = self.signum is not None
        else:
            self._polls += 1
            if self._polls % SYNC_EVERY == 0:
                self.requested = distributed.any_rank(self.signum is not None)
        return self.requested

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def handle(self, signum: int, frame: Any = None) -> None:
        if os.getpid() != self._pid:
            return  # a forked data-loader worker inherited this handler: the main process decides
        if self.signum is not None:
            if distributed.active():
                return
            raise Interrupted(signum, self.run_dir, saved=False)
        self.signum = signum
        name = signal.Signals(signum).name
        if not distributed.is_main():
            return  # rank 0 speaks for all
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        how = f"{again} again quits at once"
        if distributed.active():
            how = "the launcher ends every process after its timeout"
        sys.stderr.write(f"\nshelltrain: {name} received: finishing this step and saving a checkpoint ({how})\n")
        sys.stderr.flush()
        log.info("%s received: stopping after this step", name)


def _leave_stop_signals_to_main(init: Any, worker_id: int) -> None:
    """In a data-loader worker: ignore SIGINT and SIGTERM. A terminal's Ctrl-C and a cluster's SIGTERM
    reach every process of the job; the main process stops gracefully and shuts its workers down, which a
    worker dying of the signal first would turn into a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


def _finished_result(payload: dict[str, Any], cfg: DictConfig, run_dir: Path) -> float | None:
    """The stored result of a run that already finished training and wrote its summary, else None."""
    state = TrainState.from_dict(payload.get("train_state") or {})
    done = state.batch == 0 and (state.epoch >= cfg.trainer.epochs or state.stopped_early)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not done or summary.get("status") != "completed":
        return None
    value = summary.get(f"best_{cfg.trainer.monitor}", summary.get("test_acc"))
    return float(value) if isinstance(value, (int, float)) else math.nan


def _announce_resume(
    console: Any, cfg: DictConfig, payload: dict[str, Any], resume: Resume, state: TrainState, run_dir: Path
) -> None:
    where = f"epoch {state.epoch} done, step {state.step}"
    if state.batch:
        where += f", {state.batch} batches into epoch {state.epoch + 1}"
    say(console, f"resuming from [bold]{resume.checkpoint}[/bold] ({where})")
    if not resume.in_place:
        say(
            console,
            "the checkpoint is not the newest of its run (or lies outside a run directory): "
            "training continues in this new run directory, the original stays as it was",
        )
    changes = _config_changes(payload.get("config"), OmegaConf.to_container(cfg, resolve=True))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        say(console, f"changed since the checkpoint: {shown}")
    if any(change.startswith(("optimizer.", "scheduler.")) for change in changes):
        say(
            console,
            "note: the optimizer and schedule continue from their saved state (learning rate included), "
            "so changed optimizer.* or scheduler.* values do not apply to a resumed run",
        )


def _config_changes(before: Any, after: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for key in sorted(set(before) | set(after), key=str):
            if f"{prefix}{key}" == "trainer.resume":
                continue
            changes += _config_changes(before.get(key), after.get(key), f"{prefix}{key}.")
        return changes
    return [] if before == after else [f"{prefix.rstrip('.')}: {before!r} -> {after!r}"]


def _seed_new_run_dir(source: Path, payload: dict[str, Any], state: TrainState, checkpoints: Path) -> None:
    """A run continued in a new directory starts with the checkpoint it came from as its last.pt, and the
    best checkpoint so far as best.pt when it is at hand, so the new directory is complete by itself."""
    write_atomic(source.read_bytes(), checkpoints / LAST)
    if state.best_epoch and state.batch == 0 and state.best_epoch == state.epoch:
        write_atomic(source.read_bytes(), checkpoints / BEST)
        return
    source_best = source.parent / BEST
    if state.best_epoch and source_best.is_file() and source_best != source:
        try:
            best = load_checkpoint(source_best)
        except UserError:
            return
        if int(best.get("epoch", -1)) == state.best_epoch:
            write_atomic(source_best.read_bytes(), checkpoints / BEST)


def _non_finite_message(exc: NonFiniteLoss, cfg: DictConfig, checkpoints: Path) -> str:
    last = checkpoints / LAST
    if last.exists():
        kept = load_checkpoint(last)
        where = f"epoch {kept.get('epoch')}, step {kept.get('step')}"
        saved = f"the last good checkpoint is kept: {last} ({where})"
    else:
        saved = "no checkpoint was written before it"
    hints = [f"a lower optimizer.lr (now {cfg.optimizer.get('lr')})"]
    if str(cfg.trainer.precision) == "16-mixed":
        hints.append("trainer.precision=bf16 instead of 16-mixed (fp16 overflows)")
    if not cfg.trainer.grad_clip:
        hints.append("gradient clipping (trainer.grad_clip=1.0)")
    return f"{exc}; {saved}. Try {', '.join(hints)}"


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    try:
        write_json(summary, run_dir / "summary.json")
    except OSError as exc:  # already failing: the checkpoint matters, the note does not
        log.warning("could not write %s: %s", run_dir / "summary.json", exc)


def prune_stage(
    cfg: DictConfig,
    model: torch.nn.Module,
    data: DataBundle,
    settings: TrainerConfig,
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
        cfg.prune,
        model,
        data,
        settings,
        finetuner(cfg, data, settings, console),
        arch=cfg.model.get("name"),
        test_limit=cfg.trainer.limit_test_batches,
        say=lambda m: say(console, m),
    )
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


def finetuner(cfg: DictConfig, data: DataBundle, settings: TrainerConfig, console: Any) -> Any:
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
            **_provenance(fold_summaries[0]["device"], run_dir),
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
    table.add_row(
        "mean ± std",
        f"{section['mean']:.4f} ± {section['std']:.4f}",
        f"{section['test_acc_mean']:.4f} ± {section['test_acc_std']:.4f}",
        style="bold",
    )
    return table


def train_settings(trainer: DictConfig, device: torch.device) -> TrainerConfig:
    return replace(trainer_config(trainer), device=device)


def resolve_device(name: str) -> torch.device:
    """The configured device; under DDP a CUDA device is the GPU of this process's local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    if name.startswith("cuda") and distributed.active():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def _check_distributable(cfg: DictConfig) -> None:
    """Stages that run in one process only refuse DDP with one line (they would repeat on every rank)."""
    if cfg.task != "train":
        raise UserError(f"task={cfg.task} runs in one process; start it without torchrun or trainer.devices")
    one_process = (
        ("cv.folds", bool(cfg.get("cv") and cfg.cv.folds)),
        ("prune", cfg.prune.name != "none"),
        ("ensemble", uses_ensemble(cfg)),
    )
    for key, on in one_process:
        if on:
            raise UserError(
                f"{key} is not supported with several processes (torchrun or trainer.devices > 1); "
                "run it in one process"
            )
    if cfg.trainer.sync_batchnorm and resolve_device(cfg.trainer.device).type != "cuda":
        raise UserError(
            "trainer.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm has no CPU "
            "implementation); drop it for CPU processes"
        )


def _rng_of_this_rank(payload: dict[str, Any] | None, state: TrainState) -> dict[str, Any] | None:
    """The RNG snapshot this rank resumes with: its own one from the checkpoint (every rank's is stored under
    DDP). A checkpoint taken mid-epoch by another number of processes cannot continue that epoch exactly."""
    if payload is None:
        return None
    ranks = payload.get("rng_ranks") or [payload["rng"]]
    if len(ranks) == distributed.world_size():
        return ranks[distributed.rank()]
    if state.batch:
        raise UserError(
            f"the checkpoint was taken mid-epoch by {len(ranks)} process(es) and this run has "
            f"{distributed.world_size()}; resume it with the same number (or from an epoch-end checkpoint)"
        )
    return payload["rng"]


def _provenance(device: torch.device | str, run_dir: Path) -> dict[str, str]:
    """What every summary.json records about where its figures were made."""
    return {
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "run_dir": str(run_dir),
    }


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


def _steps_per_epoch(num_batches: int, settings: TrainerConfig) -> int:
    limit = settings.overfit_batches or settings.limit_train_batches
    batches = min(num_batches, limit) if limit else num_batches
    return -(-batches // settings.accumulate)
