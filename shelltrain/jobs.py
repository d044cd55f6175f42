"""What a job is, decided in one place: the CLI hands every composed config here.

- a training run (runner.train_and_test: build -> fit -> prune -> test -> report, the one-run pipeline);
- cross-validation: one training run per fold, then the final model (`cv.folds`);
- an ensemble: members trained here or opened as trained models, fused and tested (ensemble.ensemble_and_test);
- the compression chain: teacher ensemble -> distilled -> pruned -> int8 student (compress.run_compress);
- a task on a trained model: evaluate, predict, export (tasks.run_task); lr_find's range test (lr_find.find_lr).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from shelltrain import cv, distributed, rundir, summary
from shelltrain.audit import run_audit
from shelltrain.checks import uses_ensemble
from shelltrain.compress import run_compress
from shelltrain.console import make_console, say, show, tag_lines
from shelltrain.ensemble import ensemble_and_test
from shelltrain.environment import check_distributable, jobs_at_once, provenance, resolve_device, seed_everything
from shelltrain.errors import UserError
from shelltrain.lr_find import find_lr
from shelltrain.mirror import mirror_run
from shelltrain.resume import Resume
from shelltrain.runner import train_and_test, train_settings
from shelltrain.tasks import run_task


def run(
    cfg: DictConfig, run_dir: Path, resume: Resume | None = None, overrides: list[str] | None = None
) -> float | None:
    """`job`, then the finished run directory copied to output.mirror when it is set (mirror.py)."""
    result = job(cfg, run_dir, resume, overrides)
    mirror_run(cfg.output, run_dir, make_console(quiet=not distributed.is_main()))
    return result


def job(
    cfg: DictConfig, run_dir: Path, resume: Resume | None = None, overrides: list[str] | None = None
) -> float | None:
    """Run one job in `run_dir`. Returns the value sweeps select by: the best monitored validation metric, its
    cross-validated mean when `cv.folds` is set, evaluate's accuracy; None for the other tasks.

    `overrides` (the command line's, stored in every checkpoint) let `trainer.resume` rebuild the config."""
    if distributed.active():
        check_distributable(cfg)
    if jobs_at_once():  # sweep jobs printing to one terminal at once: each line says whose it is
        tag_lines(f"[job {HydraConfig.get().job.num}] ")
    if cfg.task == "lr_find":
        return find_lr(cfg, run_dir, make_console())
    if cfg.task == "audit":  # a data-health report; its fold models are cross-validation sub-runs
        return run_audit(cfg, run_dir)
    if cfg.task != "train":  # evaluate, predict or export a trained model
        device = resolve_device(cfg.trainer.device)
        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
        return run_task(cfg, run_dir, train_settings(cfg.trainer, device), make_console(), overrides)
    try:
        if cfg.compress is not None:
            return run_compress(cfg, run_dir, resume=resume is not None)
        if uses_ensemble(cfg):
            return ensemble_and_test(cfg, run_dir, resume=resume is not None)
        if cfg.cv.folds:
            if resume is not None:
                raise UserError("trainer.resume does not apply to cross-validation (cv.folds): run it again anew")
            return cross_validate(cfg, run_dir)
        return train_and_test(cfg, run_dir, resume=resume, overrides=overrides or [])
    except OSError as exc:  # writing the run's files: a full disk or a read-only place is the user's to fix
        inside = exc.filename is not None and Path(str(exc.filename)).absolute().is_relative_to(run_dir.absolute())
        if exc.errno in rundir.DISK_FULL or (exc.errno in rundir.NOT_WRITABLE and inside):
            raise UserError(f"cannot write '{exc.filename or run_dir}': {rundir.disk_error(exc, run_dir)}") from exc
        raise


def cross_validate(cfg: DictConfig, run_dir: Path) -> float:
    """Stratified K-fold on the train split: one sub-run per fold in run_dir/cv/fold_<k>, scored on its held-out
    fold; then (cv.refit) the final model on the whole train split in run_dir. Returns the mean fold score."""
    started = time.perf_counter()
    console = make_console()
    folds, monitor = int(cfg.cv.folds), str(cfg.trainer.monitor)
    fold_summaries = []
    for k in range(folds):
        say(console, f"[bold]cross-validation: fold {k + 1}/{folds}[/bold]")
        fold_dir = rundir.fold_dir(run_dir, k)
        fold_dir.mkdir(parents=True, exist_ok=True)
        train_and_test(cfg, fold_dir, fold=(k, folds))
        fold_summaries.append(summary.read(fold_dir))
    section = cv.section(fold_summaries, monitor, refit=bool(cfg.cv.refit))
    show(console, cv.table(section, monitor))
    say(console, f"cv {monitor}: {section['mean']:.4f} ± {section['std']:.4f} over {folds} folds")
    if cfg.cv.refit:
        say(console, "[bold]cross-validation: final model on the whole train split[/bold]")
        train_and_test(cfg, run_dir)
        result = summary.read(run_dir)
        result["wall_seconds"] = round(time.perf_counter() - started, 3)
    else:
        figures = {
            "test_acc": section["test_acc_mean"],  # no final model: the fold models' mean on the test split
            "test_loss": float(np.mean([s["test_loss"] for s in fold_summaries])),
            "params": fold_summaries[0]["params"],
        }
        result = summary.build(figures, run_dir, started, provenance(fold_summaries[0]["device"], run_dir))
    result["cv"] = section
    summary.write(result, run_dir)
    say(console, f"cv {monitor}: {section['mean']:.4f} ± {section['std']:.4f} over {folds} folds (summary.json cv)")
    return section["mean"]
