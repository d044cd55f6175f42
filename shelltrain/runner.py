"""One training run, in the order the config reads: build (data, model, optimizer) -> fit -> prune -> test ->
report. What a job is (cross-validation and ensembles are loops around this run; tasks use a trained model
instead) is decided by shelltrain.jobs.

This is the only module that knows the order; each stage is a plain function from its own module.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from shelltrain import distributed, placement, rundir, summary
from shelltrain.averaging import EmaAverager, SwaAverager, averaged_test_metrics, build_averager, build_swa
from shelltrain.calibration import calibrate, describe_calibration
from shelltrain.cam import Cam
from shelltrain.checkpoint import Checkpointer, export_state_dict, load_checkpoint
from shelltrain.compare import check_test_set
from shelltrain.console import make_console, print_summary, say, show
from shelltrain.data import DataBundle, build_data, cv_fold
from shelltrain.data.balance import balanced_loss
from shelltrain.data.fingerprint import fingerprint, split_fingerprint
from shelltrain.data.notes import carving_notes, training_notes
from shelltrain.data.transforms import describe_preprocessing
from shelltrain.distill import make_distiller
from shelltrain.engine import NonFiniteLoss, TrainState, evaluate, fit, make_scaler, monitor_mode
from shelltrain.environment import provenance, resolve_device, seed_everything
from shelltrain.errors import Interrupted, UserError
from shelltrain.finetune import make_policy, transfer_log, transfer_summary
from shelltrain.loggers import Loggers, build_loggers
from shelltrain.metrics import confusion_matrix, per_class_metrics
from shelltrain.model_card import write_card
from shelltrain.models import build_model, count_parameters, first_forward
from shelltrain.multilabel import is_multi_label
from shelltrain.multilabel_run import multilabel_test, training_loss
from shelltrain.optim import Schedule, build_optimizer, build_scheduler
from shelltrain.painting import Painter, painting
from shelltrain.placement import eval_settings
from shelltrain.plots import plot_confusion_matrix, plot_curves
from shelltrain.predictions import confused_table, error_analysis
from shelltrain.preprocess import Preprocessing
from shelltrain.profiling import build_profiler
from shelltrain.progress import ConsoleProgress
from shelltrain.prune import PruneResult, preflight
from shelltrain.prune.report import summary_keys, write_report
from shelltrain.prune.stage import prune_stage, steps_per_epoch
from shelltrain.report_page import write_run_page
from shelltrain.resume import (
    Resume,
    announce,
    finished_result,
    payload_of,
    restore_training,
    rng_of_this_rank,
    seed_new_run_dir,
)
from shelltrain.schema import TrainerConfig, trainer_config
from shelltrain.schema_values import MULTI_LABEL_MONITORS
from shelltrain.signals import GracefulStop
from shelltrain.silence import quiet
from shelltrain.transfer import follow_weights, load_weights, open_weights
from shelltrain.tta import tested_with_tta

log = logging.getLogger("shelltrain")


# -- one run: build -> fit -> prune -> test -> report --------------------------------------------------------


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
    payload = payload_of(resume, run_dir)  # None: a fresh start
    if payload is not None and resume.in_place:
        finished = finished_result(payload, cfg, run_dir)
        if finished is not None:
            say(
                console,
                f"run directory [bold]{run_dir}[/bold] already finished its {cfg.trainer.epochs} epochs; "
                "nothing to resume (its summary.json is unchanged)",
            )
            return finished
    with painting(cfg.plots and distributed.is_main()) as painter:  # the job's (cli), else one for this run
        return _pipeline(cfg, run_dir, fold, resume, payload, overrides or [], label, started, console, painter)


def _pipeline(
    cfg: DictConfig,
    run_dir: Path,
    fold: tuple[int, int] | None,
    resume: Resume | None,
    payload: dict[str, Any] | None,
    overrides: list[str],
    label: str,
    started: float,
    console: Any,
    painter: Painter | None,
) -> float:
    """Build, train, test and report (`train_and_test`'s arguments; `payload`: the checkpoint resumed from)."""
    job = build(cfg, fold, overrides, console)
    if fold is None:  # gate.baseline tested on other images: said before training
        check_test_set(cfg.gate, lambda: split_fingerprint(job.data.test.dataset))
    state = TrainState()
    if payload is not None:
        state = restore_training(
            payload, resume.checkpoint, job.model, job.optimizer, job.schedule, job.scaler, job.extra["steps_per_epoch"]
        )
    describe(cfg, job, run_dir, console)
    with build_loggers(cfg.logger if distributed.is_main() else None, run_dir) as loggers:
        state = train(cfg, job, state, run_dir, resume, payload, loggers, console, label)
        if not distributed.is_main():
            return math.nan  # rank 0 tests the model and writes the report
        if painter is not None and state.history:  # drawn while the model is tested
            curves = Path(run_dir) / rundir.PLOTS / rundir.CURVES_PLOT
            painter.draw(plot_curves, [dict(row) for row in state.history], curves, state.best_epoch)
        restore_best(job, state, run_dir)
        pruned = prune(cfg, job, state, run_dir, console)
        result, confusion, tested = test(cfg, job, state, pruned, run_dir, started, console, painter)
        if painter is not None and confusion is not None:  # None: multi-label
            title = f"test, without test_tta={result['test_tta']}" if result.get("test_tta") else "test"
            matrix = Path(run_dir) / rundir.PLOTS / rundir.CONFUSION_PLOT
            painter.draw(plot_confusion_matrix, confusion.tolist(), job.data.classes, matrix, title)
        result.update(calibrate(job.settings.calibrate, job.model, job.data, job.settings, run_dir, tested))
        if "calibration" in result:
            say(console, describe_calibration(result["calibration"]))
        exported = cfg.checkpoint.export_state_dict
        if exported:  # the model the run stands for (best epoch, pruned if pruned), as a plain state dict
            export_state_dict(job.model, rundir.exported_state_dict(run_dir, exported))
            say(console, f"checkpoint.export_state_dict: {rundir.exported_state_dict(run_dir, exported)}")
        if resume is not None:
            result["resumed_from"] = str(resume.checkpoint)
        splits = {name: len(getattr(job.data, name).dataset) for name in ("train", "val", "test")}
        report(cfg, result, painter, loggers, run_dir, console, splits)
    return state.best_metric if state.best_metric is not None else result["test_acc"]


@dataclass
class Job:
    """What `build` makes of the config for one run: what fit, prune and test work with."""

    device: torch.device
    data: DataBundle
    data_cfg: DictConfig
    stats_from: str
    weights: Any  # transfer.WeightsSource, or None for a random start
    loaded: dict[str, Any] | None  # what loading the weights matched (transfer's report)
    model: torch.nn.Module
    policy: Any  # transfer.FinetunePolicy, or None for plain training
    settings: TrainerConfig
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    scaler: torch.amp.GradScaler
    params: int
    extra: dict[str, Any]  # what every checkpoint carries besides the training state
    loss: Any = None  # the training loss in place of the engine's criterion (distill.Distiller), or None
    best_model: dict[str, torch.Tensor] | None = None  # the selected epoch's weights when this process trained it


def build(cfg: DictConfig, fold: tuple[int, int] | None, overrides: list[str], console: Any) -> Job:
    """The data, the model (with its starting weights), the optimizer and the schedule."""
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
    weights = open_weights(cfg.model)  # None for a random start
    data, data_cfg, stats_from = _build_data(cfg, weights, device, fold, console)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    example = next(iter(data.test))[0][:2].cpu()
    first_forward(model, example)
    strict = cfg.model.get("strict", True)  # a `_target_` model has no transfer keys
    model, loaded = load_weights(model, weights, strict=strict, classes=data.classes, example_inputs=example)
    if cfg.prune.name != "none":
        preflight(cfg.prune, model, example, arch=cfg.model.get("name"))
    policy = make_policy(model, cfg.finetune, notify=lambda line: say(console, line))
    settings = train_settings(cfg.trainer, device)
    placement.place(model, settings)  # before the optimizer: restored optimizer state lands beside the parameters
    optimizer = build_optimizer(cfg.optimizer, model, policy.param_groups() if policy else None)
    steps = steps_per_epoch(len(data.train), settings)
    schedule = build_scheduler(cfg.scheduler, optimizer, settings.epochs, steps, monitor_mode(settings.monitor))
    extra = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "classes": data.classes,
        "preprocessing": Preprocessing.of_data(data).as_dict(),
        "overrides": overrides,
        "steps_per_epoch": steps,  # a resume tells changed data from a changed schedule by it
    }
    if weights is not None and "pruning" in (weights.checkpoint or {}):  # trained further, it still needs rebuilding
        extra["pruning"] = weights.checkpoint["pruning"]
    parts = (device, data, data_cfg, stats_from, weights, loaded, model, policy, settings, optimizer, schedule)
    loss = make_distiller(cfg.distill, data, settings, lambda m: say(console, m), cfg.augmentation)
    loss = loss or balanced_loss(cfg.data.balance, data.train, data.num_classes)  # data.balance
    loss = loss or training_loss(settings, data)  # trainer.pos_weight
    return Job(*parts, make_scaler(settings), count_parameters(model), extra, loss)


def _build_data(
    cfg: DictConfig, weights: Any, device: torch.device, fold: tuple[int, int] | None, console: Any
) -> tuple[DataBundle, DictConfig, str]:
    """The loaders (normalized as the starting weights expect; a cv fold's split); data.loader.Loader's workers
    leave SIGINT and SIGTERM to this process."""
    data_cfg, stats, stats_from = follow_weights(cfg.data, weights)
    if cfg.trainer.compile and not data_cfg.drop_last:
        data_cfg = OmegaConf.merge(data_cfg, {"drop_last": True})  # a smaller last batch would recompile
        say(console, "trainer.compile: the last incomplete train batch of each epoch is dropped (data.drop_last)")
    multi = is_multi_label(cfg.trainer.loss)
    data = build_data(data_cfg, cfg.augmentation, cfg.trainer.seed, device.type == "cuda", stats, device, multi)
    if fold is not None:
        data = cv_fold(data, folds=fold[1], fold=fold[0], seed=cfg.data.split_seed)
    return data, data_cfg, stats_from


def describe(cfg: DictConfig, job: Job, run_dir: Path, console: Any) -> None:
    """Where the run goes, what it trains on, and where its weights come from."""
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    processes = f" in {distributed.world_size()} processes (DDP)" if distributed.active() else ""
    data = job.data
    say(
        console,
        f"{cfg.data.name}: {len(data.train.dataset)} train / {len(data.val.dataset)} val / "
        f"{len(data.test.dataset)} test images, {data.num_classes} classes; "
        f"model {cfg.model.get('name', cfg.model.get('_target_'))} ({job.params:,} parameters) on "
        f"{job.device}{processes}",
    )
    say(console, describe_preprocessing(data, job.stats_from))
    for line in training_notes(data.train, data.classes, job.data_cfg, cfg.augmentation, job.settings):
        say(console, line)  # the augmentation, data.imbalance's counts, an epoch of very few steps
    sizes = {name: len(getattr(data, name).dataset) for name in ("train", "val", "test")}
    for line in carving_notes(job.data_cfg, sizes):  # an image folder without test/ or val/ gives up train images
        say(console, line)
    for line in transfer_log(job.weights, job.loaded, job.data_cfg, job.stats_from, job.policy):
        say(console, line)


def train(
    cfg: DictConfig,
    job: Job,
    state: TrainState,
    run_dir: Path,
    resume: Resume | None,
    payload: dict[str, Any] | None,
    loggers: Loggers,
    console: Any,
    label: str,
) -> TrainState:
    """Fit the model from `state`, writing checkpoints and metrics; a signal stops it with a checkpoint to
    resume from (Interrupted), a non-finite loss with the last good one kept (UserError)."""
    main = distributed.is_main()  # under DDP only rank 0 writes files and prints
    if payload is not None:
        announce(console, cfg, payload, resume, state)
        loggers.resume(state.history)  # exactly the checkpoint's rows: none missing, none repeated
        if not resume.in_place and main:
            seed_new_run_dir(resume.checkpoint, state, run_dir, job.settings.monitor)
    loggers.start(job.extra["config"])
    averager, swa = _averages(job, payload, console)
    checkpointer = _checkpointer(cfg, job, run_dir, averager, swa, write=main)
    profiler = build_profiler(job.settings.profile and main, run_dir, job.device, console)  # trainer.profile
    helpers = [c for c in (job.policy, averager, swa, profiler) if c is not None]  # before the checkpoint they feed
    callbacks = [*helpers, ConsoleProgress(console, job.settings.epochs, label), checkpointer, loggers]
    stop = GracefulStop(run_dir)
    try:
        with stop, checkpointer:  # leaving it waits for the checkpoints written in the background
            state = fit(
                job.model,
                job.data.train,
                job.data.val,
                job.optimizer,
                job.schedule,
                job.settings,
                state=state,
                callbacks=callbacks,
                scaler=job.scaler,
                stop=stop,
                rng=rng_of_this_rank(payload, state),
                loss=job.loss,
            )
    except NonFiniteLoss as exc:
        raise UserError(_record_non_finite(exc, cfg, run_dir)) from None
    if stop.requested or stop.signum is not None:
        _stopped(stop.signum or signal.SIGTERM, state, run_dir)  # under DDP another rank may have had the signal
    job.best_model = checkpointer.best_model
    return state


def _averages(job: Job, payload: dict[str, Any] | None, console: Any) -> tuple[EmaAverager | None, SwaAverager | None]:
    """The weight averages the run keeps (trainer.ema, trainer.swa: None when off), continuing a resumed
    checkpoint's; SWA's schedule replaces the job's. The EMA's warning goes to the console and the log."""
    steps = job.settings.epochs * steps_per_epoch(len(job.data.train), job.settings)
    averager = build_averager(
        job.settings.ema, job.model, job.data.val, job.settings, payload, steps, lambda line: say(console, line)
    )
    swa, job.schedule = build_swa(job.settings.swa, job.model, job.optimizer, job.schedule, payload)
    return averager, swa


def _checkpointer(cfg: DictConfig, job: Job, run_dir: Path, averager: Any, swa: Any, write: bool) -> Checkpointer:
    """last.pt every epoch, best.pt by trainer.monitor (kept in memory too), the kept epochs; the averages travel."""
    keep = cfg.trainer.keep_checkpoints
    return Checkpointer(
        run_dir,
        job.model,
        job.optimizer,
        job.schedule,
        job.scaler,
        job.extra,
        job.settings.monitor,
        keep,
        write,
        averager=averager,
        swa=swa,
    )


def _stopped(signum: int, state: TrainState, run_dir: Path) -> None:
    """Record where a stopped run is (its last.pt continues it) and raise Interrupted."""
    if distributed.is_main():
        summary.record(
            run_dir,
            "interrupted",
            keep=False,
            signal=signal.Signals(signum).name,
            epochs_completed=state.epoch,
            step=state.step,
            batches_into_next_epoch=state.batch,
        )
    raise Interrupted(signum, run_dir)


def _record_non_finite(exc: NonFiniteLoss, cfg: DictConfig, run_dir: Path) -> str:
    """The message for a loss that became NaN or infinite; recorded in summary.json when a checkpoint is kept."""
    last = rundir.last_checkpoint(run_dir)
    if last.exists():
        kept = load_checkpoint(last)
        saved = f"the last good checkpoint is kept: {last} (epoch {kept.get('epoch')}, step {kept.get('step')})"
    else:
        saved = "no checkpoint was written before it"
    hints = [f"a lower optimizer.lr (now {cfg.optimizer.get('lr')})"]
    if str(cfg.trainer.precision) == "16-mixed":
        hints.append("trainer.precision=bf16 instead of 16-mixed (fp16 overflows)")
    if not cfg.trainer.grad_clip:
        hints.append("gradient clipping (trainer.grad_clip=1.0)")
    message = f"{exc}; {saved}. Try {', '.join(hints)}"
    if last.exists() and distributed.is_main():
        summary.record(run_dir, "failed", keep=False, error=message, epochs_completed=exc.epoch - 1)
    return message


def restore_best(job: Job, state: TrainState, run_dir: Path) -> None:
    """The model the run stands for is the selected epoch's (best.pt), not the last one trained: kept in memory when
    this process trained that epoch, read from best.pt when an earlier process did (a resumed run)."""
    if job.best_model is not None:
        job.model.load_state_dict(job.best_model)
    elif state.epoch > 0 and rundir.best_checkpoint(run_dir).exists():
        job.model.load_state_dict(load_checkpoint(rundir.best_checkpoint(run_dir))["model"])


def prune(cfg: DictConfig, job: Job, state: TrainState, run_dir: Path, console: Any) -> PruneResult | None:
    """Prune and fine-tune the model when `prune` is set (prune.json); the pruned model and the settings it runs
    with then replace the job's. None without pruning."""
    if cfg.prune.name == "none":
        return None
    pruned = prune_stage(cfg, job.model, job.data, job.settings, state, run_dir, job.extra, console)
    job.model = pruned.model
    job.settings = eval_settings(pruned.model, job.settings)  # int8 models run on the CPU
    write_report(pruned.report, run_dir, cfg.plots)
    return pruned


def test(
    cfg: DictConfig,
    job: Job,
    state: TrainState,
    pruned: PruneResult | None,
    run_dir: Path,
    started: float,
    console: Any,
    painter: Painter | None,
) -> tuple[dict[str, Any], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The model on the test split: summary.json's figures, the confusion matrix (None: multi-label) and the
    (logits, targets); the error analysis's pictures go to `painter` (None: no pictures)."""
    plain, logits, targets = tested_with_tta(job.model, job.data.test, job.settings, "test")  # + trainer.test_tta's
    if is_multi_label(job.settings.loss):  # thresholds tuned on val, then the test figures at them
        confusion, analysis = None, multilabel_test(job.model, job.data, job.settings, run_dir, (logits, targets))
    else:
        confusion, analysis = _error_analysis(cfg, job, run_dir, logits, targets, console, painter)
    best_row = state.history[state.best_epoch - 1] if state.best_epoch else {}
    figures: dict[str, Any] = {
        **plain,
        **analysis,
        "best_val_acc": best_row.get("val_acc"),
        "best_val_loss": best_row.get("val_loss"),
        **{f"best_{key}": best_row[key] for key in MULTI_LABEL_MONITORS if key in best_row},  # trainer.loss=bce
        "best_epoch": state.best_epoch,
        "epochs_completed": state.epoch,
        "stopped_early": state.stopped_early,
        "params": job.params,
        "processes": distributed.world_size(),
        "data_fingerprint": fingerprint(job.data, cfg.data.split_seed),  # which images each split used
    }
    if pruned is None:  # the EMA weights of the selected epoch (best.pt's), SWA's average (last.pt's)
        figures.update(averaged_test_metrics(job.model, job.data, job.settings, run_dir, best_row, job.extra))
    if job.weights is not None or job.policy is not None:
        figures["transfer"] = transfer_summary(
            job.model, job.loaded, job.data, job.stats_from, job.policy, cfg.optimizer.lr
        )
    if pruned is not None:  # the headline describes best.pt, the pruned model; the unpruned one is in "prune"
        with quiet():
            val = evaluate(job.model, job.data.val, job.settings, limit=job.settings.limit_val_batches)
        figures.update(params=pruned.report["after"]["params"], best_val_acc=val["acc"], best_val_loss=val["loss"])
        figures.update(summary_keys(pruned.report))
        figures["prune"] = pruned.report
    result = summary.build(figures, run_dir, started, provenance(job.device, run_dir))
    return result, confusion, (logits, targets)


def _error_analysis(
    cfg: DictConfig,
    job: Job,
    run_dir: Path,
    logits: torch.Tensor,
    targets: torch.Tensor,
    console: Any,
    painter: Painter | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The confusion matrix, per-class scores and most-confused pairs; predictions.csv and, with plots, the
    top-loss gallery and per-class chart."""
    confusion = confusion_matrix(logits, targets, job.data.num_classes)
    per_class = per_class_metrics(confusion, job.data.classes)
    cam = Cam(job.model, cfg.report.cam_layer, "report.cam_layer", console) if cfg.report.cam else None
    tested = job.data.test.dataset
    confused = error_analysis(run_dir, logits, targets, tested, job.data, "test", per_class, painter, cam)
    return confusion, {"per_class": per_class, "confused_pairs": confused}


def report(
    cfg: DictConfig,
    result: dict[str, Any],
    painter: Painter | None,
    loggers: Loggers,
    run_dir: Path,
    console: Any,
    splits: dict[str, int],
) -> None:
    """summary.json, the loggers' last word, the model card, report.html and the table, once `painter` has drawn
    the pictures; `splits`: images per split."""
    summary.write(result, run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.report.model_card:
        write_card(config, result, splits, run_dir)
    if painter is not None:
        painter.wait()
    if cfg.report.html:  # after the plots and the card: the page inlines the one and links the other
        write_run_page(run_dir, config, result)
    loggers.finish(result)  # after the plots: a logger may upload them
    print_summary(console, result, cfg.report.per_job)
    if result.get("confused_pairs") and cfg.report.per_job != "line":
        show(console, confused_table(result["confused_pairs"]))
    say(console, f"run directory: [bold]{run_dir}[/bold]")


def train_settings(trainer: DictConfig, device: torch.device) -> TrainerConfig:
    """The trainer group as the engine reads it, on the device this process trains on."""
    return replace(trainer_config(trainer), device=device)
