"""The pipeline, in order: data -> model -> optimizer -> train -> (prune) -> (ensemble) -> test -> report.

This is the only module that knows the order; each stage is a plain function from its own module.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf

from shelltrain.checkpoint import (
    BEST, DISK_FULL, LAST, NOT_WRITABLE, Checkpointer, Resume, disk_error, load_checkpoint, restore_training,
    write_atomic,
)  # fmt: skip
from shelltrain.data import build_data
from shelltrain.engine import (
    Callback, NonFiniteLoss, TrainSettings, TrainState, evaluate, fit, make_scaler, monitor_mode,
)  # fmt: skip
from shelltrain.errors import Interrupted, UserError
from shelltrain.models import build_model, count_parameters, materialize_lazy
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.report import ConsoleProgress, MetricsCSV, make_console, say, summary_table, write_json

log = logging.getLogger("shelltrain")


def run(
    cfg: DictConfig, run_dir: Path, resume: Resume | None = None, overrides: list[str] | None = None
) -> float:
    """Run one job in `run_dir`; returns the best monitored validation metric (for sweepers).

    `overrides` (the command line's, stored in every checkpoint) let `trainer.resume` rebuild the config."""
    try:
        return _run(cfg, run_dir, resume, overrides or [])
    except OSError as exc:  # writing the run's files: a full disk or a read-only place is the user's to fix
        inside = exc.filename is not None and Path(str(exc.filename)).absolute().is_relative_to(run_dir.absolute())
        if exc.errno in DISK_FULL or (exc.errno in NOT_WRITABLE and inside):
            raise UserError(f"cannot write '{exc.filename or run_dir}': {disk_error(exc, run_dir)}") from exc
        raise


def _run(cfg: DictConfig, run_dir: Path, resume: Resume | None, overrides: list[str]) -> float:
    started = time.perf_counter()
    console = make_console()
    checkpoints = run_dir / "checkpoints"
    payload = (resume.payload or load_checkpoint(resume.checkpoint)) if resume else None
    if payload is None and (checkpoints / LAST).exists():
        raise UserError(
            f"run directory '{run_dir}' already holds a run (checkpoints/{LAST}); continue it with "
            f"trainer.resume={run_dir} (or trainer.resume=auto), or choose a new hydra.run.dir"
        )
    if payload is not None and resume is not None and resume.in_place:
        finished = _finished_result(payload, cfg, run_dir)
        if finished is not None:
            say(console, f"run directory [bold]{run_dir}[/bold] already finished its {cfg.trainer.epochs} epochs; "
                         "nothing to resume (its summary.json is unchanged)")  # fmt: skip
            return finished

    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)

    data = build_data(cfg.data, cfg.augmentation, seed=cfg.trainer.seed, pin_memory=device.type == "cuda")
    for loader in (data.train, data.val, data.test):
        loader.worker_init_fn = functools.partial(_leave_stop_signals_to_main, loader.worker_init_fn)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    materialize_lazy(model, next(iter(data.val))[0][:2])
    settings = train_settings(cfg.trainer, device)
    optimizer = build_optimizer(cfg.optimizer, model)
    steps_per_epoch = _steps_per_epoch(len(data.train), settings)
    schedule = build_scheduler(
        cfg.scheduler, optimizer, settings.epochs, steps_per_epoch, monitor_mode(settings.monitor)
    )
    scaler = make_scaler(settings)
    params = count_parameters(model)
    state = TrainState()
    if payload is not None and resume is not None:
        state = restore_training(payload, resume.checkpoint, model, optimizer, schedule, scaler)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    say(
        console,
        f"{cfg.data.name}: {len(data.train.dataset)} train / {len(data.val.dataset)} val / "
        f"{len(data.test.dataset)} test images, {data.num_classes} classes; "
        f"model {cfg.model.get('name', cfg.model.get('_target_'))} ({params:,} parameters) on {device}",
    )

    metrics = MetricsCSV(run_dir / "metrics.csv")
    if payload is not None and resume is not None:
        _announce_resume(console, cfg, payload, resume, state, run_dir)
        metrics.sync(state.history)  # exactly the checkpoint's rows: none missing, none repeated
        if not resume.in_place:
            _seed_new_run_dir(resume.checkpoint, payload, state, checkpoints)
    checkpointer = Checkpointer(
        checkpoints, model, optimizer, schedule, scaler,
        extra={
            "config": OmegaConf.to_container(cfg, resolve=True), "classes": data.classes, "overrides": overrides,
        },
        monitor=settings.monitor, keep=cfg.trainer.keep_checkpoints,
    )  # fmt: skip
    stop = GracefulStop(run_dir)
    try:
        with stop:
            state = fit(
                model, data.train, data.val, optimizer, schedule, settings, state=state,
                callbacks=[ConsoleProgress(console, settings.epochs), checkpointer, _MetricsWriter(metrics)],
                scaler=scaler, stop=stop, rng=payload["rng"] if payload is not None else None,
            )  # fmt: skip
    except NonFiniteLoss as exc:
        message = _non_finite_message(exc, cfg, checkpoints)
        if (checkpoints / LAST).exists():
            _write_summary(run_dir, {"status": "failed", "error": message, "epochs_completed": exc.epoch - 1})
        raise UserError(message) from None
    if stop.signum is not None:
        _write_summary(run_dir, {
            "status": "interrupted", "signal": signal.Signals(stop.signum).name, "epochs_completed": state.epoch,
            "step": state.step, "batches_into_next_epoch": state.batch, "run_dir": str(run_dir),
        })  # fmt: skip
        raise Interrupted(stop.signum, run_dir)

    if state.epoch > 0 and (checkpoints / BEST).exists():
        model.load_state_dict(load_checkpoint(checkpoints / BEST)["model"])
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
    if resume is not None:
        summary["resumed_from"] = str(resume.checkpoint)
    write_json(summary, run_dir / "summary.json")
    console.print(summary_table(summary))
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    return state.best_metric if state.best_metric is not None else test["acc"]


class GracefulStop:
    """While training, the first SIGINT or SIGTERM asks the engine to stop after the current step (it
    then writes a resumable checkpoint); a second one interrupts at once. Called, it says whether a
    stop was asked for; `signum` is the signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __call__(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "GracefulStop":
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
            raise Interrupted(signum, self.run_dir, saved=False)
        self.signum = signum
        name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        sys.stderr.write(
            f"\nshelltrain: {name} received: finishing this step and saving a checkpoint "
            f"({again} again quits at once)\n"
        )
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
        say(console, "the checkpoint is not the newest of its run (or lies outside a run directory): "
                     "training continues in this new run directory, the original stays as it was")  # fmt: skip
    changes = _config_changes(payload.get("config"), OmegaConf.to_container(cfg, resolve=True))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        say(console, f"changed since the checkpoint: {shown}")
    if any(change.startswith(("optimizer.", "scheduler.")) for change in changes):
        say(console, "note: the optimizer and schedule continue from their saved state (learning rate included), "
                     "so changed optimizer.* or scheduler.* values do not apply to a resumed run")  # fmt: skip


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
    except OSError:
        pass  # already failing: the checkpoint matters, the note does not


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
        checkpoint_every_n_steps=trainer.get("checkpoint_every_n_steps") or 0,
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
