"""The multi-label steps of a training run (trainer.loss=bce; the figures themselves are multilabel.py's): the
training loss with trainer.pos_weight, and the test step: per-class thresholds tuned on the val split, stored in
best.pt and last.pt (key `thresholds`, read back by trained.open_trained), then the test split measured at them
(mAP, micro/macro F1, precision, recall, per class AP/precision/recall/F1/threshold) and predictions.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shelltrain import rundir
from shelltrain.checkpoint import add_to_run_checkpoints
from shelltrain.data import DataBundle, unsharded
from shelltrain.data.balance import train_labels
from shelltrain.engine import metrics_from_logits, predict
from shelltrain.fusion import fuse_labels
from shelltrain.multilabel import (
    WeightedBce,
    balanced_pos_weight,
    is_multi_label,
    scores,
    tune_thresholds,
)
from shelltrain.predictions import sample_ids, write_label_predictions
from shelltrain.schema import TrainerConfig

HEADLINE = ("map", "f1_micro", "f1_macro", "precision", "recall")  # summary.json's test_<figure> at the thresholds


def training_loss(settings: TrainerConfig, data: DataBundle) -> WeightedBce | None:
    """trainer.pos_weight=balanced: BCE whose positives weigh negatives/positives of the train split, per class;
    None otherwise (the engine's criterion: plain BCE)."""
    if not is_multi_label(settings.loss) or settings.pos_weight is None:
        return None
    return WeightedBce(balanced_pos_weight(train_labels(data.train), data.num_classes))


def tuned_thresholds(model: nn.Module, data: DataBundle, settings: TrainerConfig) -> list[float]:
    """Each class's F1-best threshold on the whole val split."""
    logits, targets = predict(model, unsharded(data.val), settings, limit=settings.limit_val_batches)
    return tune_thresholds(logits, targets)


def labelled_figures(
    logits: torch.Tensor, targets: torch.Tensor, thresholds: list[float], classes: list[str], split: str
) -> dict[str, Any]:
    """summary.json's multi-label figures of `split` at `thresholds`: `{split}_map`, `_f1_micro`, `_f1_macro`,
    `_precision`, `_recall`, `per_class` ({name: ap, precision, recall, f1, support, threshold}) and
    `thresholds` ({name: threshold})."""
    measured = scores(logits, targets, torch.tensor(thresholds))
    per_class = measured.pop("per_class")
    figures: dict[str, Any] = {f"{split}_{key}": measured[key] for key in HEADLINE}
    figures["per_class"] = {
        str(name): {key: values[k] for key, values in per_class.items()} for k, name in enumerate(classes)
    }
    figures["thresholds"] = {str(name): thresholds[k] for k, name in enumerate(classes)}
    return figures


def multilabel_test(
    model: nn.Module,
    data: DataBundle,
    settings: TrainerConfig,
    run_dir: Path,
    tested: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    """The test step of a multi-label run: thresholds tuned on val and stored with the model, the test split's
    `tested` (logits, targets) measured at them, predictions.csv written."""
    thresholds = tuned_thresholds(model, data, settings)
    add_to_run_checkpoints(run_dir, thresholds=thresholds)
    logits, targets = tested
    ids = sample_ids(data.test.dataset, len(targets))
    write_label_predictions(run_dir / rundir.PREDICTIONS, ids, logits, thresholds, data.classes, targets, "test")
    return labelled_figures(logits, targets, thresholds, data.classes, "test")


def fused_labels(
    rule: str,
    weights: list[float],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    settings: TrainerConfig,
    classes: list[str],
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """A multi-label ensemble: the members' (M x N x C logits, targets) of val and test fused by `rule` on their
    sigmoid probabilities (fusion.fuse_labels); the val and test figures at 1/2, and the test figures at thresholds
    tuned on the fused val split (with `thresholds`, which ensemble.json keeps)."""
    fused = [fuse_labels(rule, logits, weights) for logits, _ in (val, test)]
    thresholds = tune_thresholds(fused[0], val[1])
    tested = labelled_figures(fused[1], test[1], thresholds, classes, "test")
    return metrics_from_logits(fused[0], val[1], settings), metrics_from_logits(fused[1], test[1], settings), tested
