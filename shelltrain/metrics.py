"""Classification metrics from logits: the split's headline figures, the confusion matrix, per-class scores.

One function serves the training run's test split and `task=evaluate` on any split, so both report
the same keys computed the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from shelltrain.engine import metrics_from_logits
from shelltrain.multilabel import is_multi_label
from shelltrain.schema import TrainerConfig

TOP_K = 5  # top-5 accuracy is reported when there are more classes than this
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error


def split_metrics(logits: torch.Tensor, targets: torch.Tensor, settings: TrainerConfig, split: str) -> dict[str, float]:
    """`{split}_acc`, `{split}_loss`, the calibration figures `{split}_nll` and `{split}_ece` and, with more than
    five classes, `{split}_top5`. Multi-label (trainer.loss=bce): `{split}_loss`, `_acc`, `_map`, `_f1_micro`,
    `_f1_macro`, `_precision`, `_recall` at probability 1/2 (the run's tuned thresholds: multilabel_run)."""
    measured = metrics_from_logits(logits, targets, settings)
    if is_multi_label(settings.loss):
        return {f"{split}_{key}": value for key, value in measured.items()}
    result = {f"{split}_acc": measured["acc"], f"{split}_loss": measured["loss"]}
    result.update({f"{split}_nll": nll(logits, targets), f"{split}_ece": expected_calibration_error(logits, targets)})
    if logits.ndim == 2 and logits.shape[1] > TOP_K:
        result[f"{split}_top{TOP_K}"] = top_k_accuracy(logits, targets, TOP_K)
    return result


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean negative log-likelihood of the true class under the softmax (the loss may be MSE or smoothed)."""
    if targets.numel() == 0:
        return float("nan")
    return torch.nn.functional.cross_entropy(logits.float(), targets).item()


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al., 2017): the predictions binned by confidence (the top softmax probability) into `bins`
    equal-width bins of (0, 1]; the mean over bins of |accuracy - mean confidence|, weighted by the bin's share."""
    if targets.numel() == 0:
        return float("nan")
    confidence, predicted = logits.float().softmax(1).max(1)
    correct = (predicted == targets).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # bin b holds (b/bins, (b+1)/bins]
    count = torch.bincount(index, minlength=bins).double()
    gap = torch.bincount(index, weights=correct, minlength=bins) - torch.bincount(
        index, weights=confidence.double(), minlength=bins
    )
    return (gap.abs().sum() / count.sum()).item()


def top_k_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    if targets.numel() == 0:
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == targets.unsqueeze(1)).any(dim=1).float().mean().item()


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """num_classes x num_classes counts: row = true class, column = predicted class."""
    predicted = logits.argmax(1) if logits.numel() else torch.empty(0, dtype=torch.long)
    pairs = targets.long() * num_classes + predicted.long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(confusion: torch.Tensor, classes: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support per class name; a ratio with nothing to divide by is 0."""
    matrix = confusion.double()
    hits = matrix.diag()
    predicted, support = matrix.sum(0), matrix.sum(1)
    precision = hits / predicted.clamp_min(1)
    recall = hits / support.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return {
        str(name): {
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(support[i].item()),
        }
        for i, name in enumerate(classes)
    }
