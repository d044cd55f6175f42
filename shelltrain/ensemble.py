"""Ensembling: several classifiers fused into one prediction.

`run_ensemble` is the stage: it gathers the members (`shelltrain.members`: trained in this run, loaded from
checkpoints or ensemble run directories, or the best jobs of a sweep). A member that trains is a complete
sub-run in `members/<i>`, run by the function the runner hands over (the whole pipeline: fine-tuning, pruning,
loggers, plots, summary); every member is then opened from its checkpoint by `trained.open_trained`,
evaluated and fused (`shelltrain.fusion`). The run directory keeps `ensemble.json` and
`members/<i>/checkpoints/best.pt`, so it is itself a reusable ensemble (`model.weights=<dir>` or an
`ensemble.checkpoints` entry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from shelltrain import rundir, summary
from shelltrain.checkpoint import save_checkpoint
from shelltrain.console import make_console, print_summary, say, show
from shelltrain.data import DataBundle, build_data
from shelltrain.engine import metrics_from_logits
from shelltrain.environment import provenance, resolve_device, seed_everything
from shelltrain.errors import Interrupted, UserError
from shelltrain.fusion import accuracy_weights, fuse, fused_metrics, member_logits, use_vmap
from shelltrain.loggers import build_loggers
from shelltrain.members import Member, describe_origin, finetune_config, gather_members, portable
from shelltrain.metrics import confusion_matrix, per_class_metrics
from shelltrain.models import count_parameters
from shelltrain.multilabel import is_multi_label
from shelltrain.multilabel_run import fused_labels
from shelltrain.plots import plot_confusion_matrix, plot_members
from shelltrain.resume import Resume
from shelltrain.runner import train_and_test, train_settings
from shelltrain.schema import TrainerConfig
from shelltrain.silence import quiet
from shelltrain.trained import open_trained

# train_member(member_cfg, out_dir, label, resume): the whole pipeline for one model, a sub-run in out_dir
TrainMember = Callable[[DictConfig, Path, str, Resume | None], Any]


@dataclass
class EnsembleResult:
    report: dict[str, Any]  # what ensemble.json holds
    val: dict[str, float]
    test: dict[str, float]
    members: list[Member]
    confusion: torch.Tensor | None  # of the ensemble's test predictions (None: multi-label)
    labelled: dict[str, Any] | None = None  # multi-label: test_map, ..., per_class, thresholds (multilabel_run)

    def figures(self) -> dict[str, Any]:
        """summary.json's headline keys for the ensemble, and its section."""
        return {
            "best_val_acc": self.val["acc"],
            "best_val_loss": self.val["loss"],
            "best_epoch": None,
            "epochs_completed": max(m.epochs for m in self.members),
            "stopped_early": False,
            "params": sum(m.params for m in self.members),
            "ensemble": {k: v for k, v in self.report.items() if k != "classes"},
        }


def ensemble_and_test(cfg: DictConfig, run_dir: Path, resume: bool = False) -> float:
    """An ensemble job: members trained here are complete sub-runs in run_dir/members/<i> (like cv folds), loaded
    members are trained models (checkpoints, ensemble runs, a sweep's best jobs); all are fused and tested on this
    run's data. `resume` continues one that was interrupted. Returns the ensemble's validation metric (what sweeps
    select by)."""
    started = time.perf_counter()
    console = make_console()
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, cfg.trainer.threads)
    multi = is_multi_label(cfg.trainer.loss)
    data = build_data(cfg.data, cfg.augmentation, cfg.trainer.seed, device.type == "cuda", multi_label=multi)
    settings = train_settings(cfg.trainer, device)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    say(
        console,
        f"{cfg.data.name}: {len(data.train.dataset)} train / {len(data.val.dataset)} val / "
        f"{len(data.test.dataset)} test images, {data.num_classes} classes",
    )
    with build_loggers(cfg.logger, run_dir) as loggers:  # ends them as failed when the ensemble raises
        loggers.start(OmegaConf.to_container(cfg, resolve=True))

        def train_member(member_cfg: DictConfig, member_dir: Path, label: str, continued: Resume | None) -> None:
            try:
                train_and_test(member_cfg, member_dir, label=label, resume=continued)
            except Interrupted as exc:  # the ensemble resumes as a whole, from its own run directory
                raise Interrupted(exc.signum, run_dir, exc.saved) from exc

        fused = run_ensemble(cfg, data, settings, train_member, run_dir, console, resume)
        figures = {"test_acc": fused.test["acc"], "test_loss": fused.test["loss"], **fused.figures()}
        if fused.labelled is None:
            figures["per_class"] = per_class_metrics(fused.confusion, data.classes)
        else:  # multi-label: at the thresholds tuned on the fused val split
            figures.update(fused.labelled)
        result = summary.build(figures, run_dir, started, provenance(device, run_dir))
        summary.write(result, run_dir)
        loggers.finish(result)
    if cfg.plots:
        _plot(fused, data.classes, run_dir)
    print_summary(console, result, cfg.report.per_job)
    say(console, f"run directory: [bold]{run_dir}[/bold]")
    value = fused.val[settings.monitor.removeprefix("val_")]
    return fused.test["acc"] if math.isnan(value) else value


def _plot(fused: EnsembleResult, classes: list[str], run_dir: Path) -> None:
    """The ensemble's confusion matrix and each member's test accuracy beside the ensemble's."""
    plot_confusion_matrix(fused.confusion, classes, run_dir / rundir.PLOTS / rundir.CONFUSION_PLOT)
    rows = [{"name": f"{m['index']}: {m['model']}", "test_acc": m["test_acc"]} for m in fused.report["members"]]
    plot_members(
        [*rows, {"name": f"ensemble ({fused.report['rule']})", "test_acc": fused.test["acc"]}],
        run_dir / rundir.PLOTS / "members.png",
    )


def run_ensemble(
    cfg: DictConfig,
    data: DataBundle,
    settings: TrainerConfig,
    train_member: TrainMember,
    run_dir: Path,
    console: Console,
    resume: bool = False,
) -> EnsembleResult:
    """Gather the members (every one checked before any trains), train or fine-tune those that need it one
    after another as sub-runs in members/<i>, evaluate them all, fuse them and write ensemble.json.

    `resume` continues an interrupted ensemble in run_dir: every member sub-run with a checkpoint resumes in
    place (one that finished returns at once), the others train."""
    members, reused = gather_members(cfg, data, lambda line: say(console, line))
    rule, weights = _rule(cfg, members, reused)
    say(console, f"ensemble: {rule} of {len(members)} members")
    trains_loaded = settings.epochs > 0 or cfg.prune.name != "none"  # loaded members go through the pipeline too
    for i, member in enumerate(members):
        if member.cfg is None and trains_loaded:
            member.cfg = finetune_config(cfg, member, i)
        _prepare_member(member, i, len(members), train_member, run_dir, console, resume)

    models = [m.model for m in members]
    stacked = use_vmap(cfg.ensemble.vmap, models, settings)
    val_logits, val_targets = member_logits(models, data.val, settings, settings.limit_val_batches, stacked)
    test_logits, test_targets = member_logits(models, data.test, settings, cfg.trainer.limit_test_batches, stacked)
    for member, val, test in zip(members, val_logits, test_logits):
        member.val = metrics_from_logits(val, val_targets, settings)
        member.test = metrics_from_logits(test, test_targets, settings)

    if rule == "weighted" and weights is None:
        weights = accuracy_weights([m.val["acc"] for m in members], cfg.ensemble.temperature)
    elif rule == "weighted":
        weights = [w / sum(weights) for w in weights]
    else:
        weights = [1.0 / len(members)] * len(members)  # average: equal shares; vote: one vote each
    labelled = confusion = None
    if is_multi_label(settings.loss):  # sigmoid probabilities fused per class, thresholds tuned on val
        pairs = (val_logits, val_targets), (test_logits, test_targets)
        val, test, labelled = fused_labels(rule, weights, *pairs, settings, data.classes)
    else:
        val = fused_metrics(*fuse(rule, val_logits.softmax(2), weights), val_targets)
        test_probs, test_preds = fuse(rule, test_logits.softmax(2), weights)
        test = fused_metrics(test_probs, test_preds, test_targets)
        confusion = confusion_matrix(F.one_hot(test_preds, data.num_classes), test_targets, data.num_classes)

    report = _report(rule, weights, cfg, members, val, test, stacked, data.classes)
    if labelled is not None:
        report["thresholds"] = list(labelled["thresholds"].values())  # trained.open_trained's, with the rule
    rundir.write_json(report, run_dir / rundir.ENSEMBLE_REPORT)
    show(console, ensemble_table(report))
    return EnsembleResult(report, val, test, members, confusion, labelled)


def _rule(cfg: DictConfig, members: list[Member], reused: dict[str, Any] | None) -> tuple[str, list[float] | None]:
    """The combination rule and the given weights: the config's, or (model.weights=<ensemble dir> with
    ensemble=none) that ensemble's as it was saved."""
    rule, weights = cfg.ensemble.name, cfg.ensemble.weights
    if not members:
        raise UserError(
            f"ensemble={rule} has no members: model.weights='{cfg.model.get('weights')}' is not an ensemble run "
            "directory; set ensemble.members, ensemble.checkpoints or ensemble.sweep"
        )
    if reused is not None and rule == "none":
        rule = reused["rule"]
        weights = reused.get("weights") if rule == "weighted" else None
    if weights is not None and len(weights) != len(members):
        raise UserError(
            f"ensemble.weights has {len(weights)} entries for {len(members)} members; give one weight per member"
        )
    return rule, weights


def _prepare_member(
    member: Member, i: int, count: int, train_member: TrainMember, run_dir: Path, console: Console, resume: bool
) -> None:
    """Train (or continue) member `i` as the sub-run members/<i> and load it, or save a loaded member's copy
    there, so the run directory is self-contained."""
    out_dir = rundir.member_dir(run_dir, i)
    label = f"member {i + 1}/{count}"
    if member.cfg is not None:
        last = rundir.last_checkpoint(out_dir)
        continued = Resume(last, in_place=True) if resume and last.is_file() else None
        doing = "continuing" if continued else "training"
        say(console, f"[bold]ensemble {label}[/bold]: {doing} {member.model_name} ({describe_origin(member.origin)})")
        out_dir.mkdir(parents=True, exist_ok=True)
        train_member(member.cfg, out_dir, label, continued)
        member.trained = open_trained(out_dir, f"ensemble {label}")
        member.model = member.trained.module  # trained on this run's data: its preprocessing
        member.epochs = int(rundir.read_json(rundir.summary(out_dir))["epochs_completed"])
    else:
        say(console, f"ensemble {label}: {member.model_name} from {describe_origin(member.origin)}")
        with quiet():  # quantized tensors warn when serialized
            save_checkpoint(portable(member), rundir.best_checkpoint(out_dir))
    member.saved = rundir.best_checkpoint(rundir.member_dir(Path(), i)).as_posix()
    member.params = count_parameters(member.model)


def _report(
    rule: str,
    weights: list[float],
    cfg: DictConfig,
    members: list[Member],
    val: dict[str, float],
    test: dict[str, float],
    stacked: bool,
    classes: list[str],
) -> dict[str, Any]:
    report: dict[str, Any] = {"rule": rule, "weights": weights}
    if rule == "weighted" and cfg.ensemble.weights is None:
        report["temperature"] = cfg.ensemble.temperature
    report["members"] = [
        {
            "index": i,
            "origin": m.origin,
            "checkpoint": m.saved,
            "model": m.model_name,
            "params": m.params,
            "epochs_trained": m.epochs,
            "weight": w,
            "val_acc": m.val["acc"],
            "val_loss": m.val["loss"],
            "test_acc": m.test["acc"],
            "test_loss": m.test["loss"],
        }
        for i, (m, w) in enumerate(zip(members, weights))
    ]
    member_test = [m.test["acc"] for m in members]
    report.update(
        val_acc=val["acc"],
        val_loss=val["loss"],
        test_acc=test["acc"],
        test_loss=test["loss"],
        members_mean_test_acc=sum(member_test) / len(member_test),
        members_best_test_acc=max(member_test),
        evaluation="vmap" if stacked else "loop",
        classes=list(classes),
    )
    return report


def ensemble_table(report: dict[str, Any]) -> Table:
    """The members against the ensemble: origin, size, weight, validation and test accuracy."""
    table = Table(title=f"ensemble ({report['rule']}) vs its members", show_header=True)
    for column, justify in [
        ("member", "left"),
        ("model", "left"),
        ("origin", "left"),
        ("params", "right"),
        ("weight", "right"),
        ("val_acc", "right"),
        ("test_acc", "right"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for m in report["members"]:
        table.add_row(
            str(m["index"]),
            m["model"],
            describe_origin(m["origin"], short=True),
            f"{m['params']:,}",
            f"{m['weight']:.3f}",
            _acc(m["val_acc"]),
            _acc(m["test_acc"]),
        )
    table.add_section()
    table.add_row(
        "[bold]ensemble[/bold]",
        report["rule"],
        f"{len(report['members'])} members",
        f"{sum(m['params'] for m in report['members']):,}",
        "1.000",
        f"[bold]{_acc(report['val_acc'])}[/bold]",
        f"[bold]{_acc(report['test_acc'])}[/bold]",
    )
    return table


def _acc(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"
