"""Multi-label classification (`trainer.loss=bce`): an image may carry several labels. One sigmoid per class,
binary cross-entropy (label smoothing pulls each 0/1 target towards 1/2; `trainer.pos_weight=balanced` weighs each
class's positives by its negatives/positives ratio on the train split), and the figures that fit: mAP (the mean
over classes of average precision), micro and macro F1, precision and recall.

Decisions are per class: class k is predicted when sigmoid(logit_k) >= threshold_k. The thresholds are tuned on
the val split after training (each class's F1-best score) and stored with the model (best.pt and last.pt, key
`thresholds`), so evaluate, predict and export decide as the run did.

Targets: a batch of multi-hot float rows (N x C); single-label data (N class indices) is its one-hot rows, so any
data set trains with trainer.loss=bce. This module is torch only: the engine, metrics and tasks import it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

LOSS = "bce"  # the trainer.loss that makes a run multi-label
SEPARATOR = "|"  # between the labels of one manifest cell: cat|dog
DEFAULT_THRESHOLD = 0.5  # the decision before thresholds are tuned (per-epoch validation)


def is_multi_label(loss: str) -> bool:
    """Whether trainer.loss makes the run multi-label."""
    return loss == LOSS


def multi_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float N x C 0/1 rows: multi-hot rows as given (soft ones rounded at 1/2), class indices one-hot."""
    if targets.ndim == 2:
        return (targets >= 0.5).float()
    return F.one_hot(targets.long(), num_classes).float()


def bce(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over images and classes; `smoothing` moves each target
    eps/2 towards 1/2, `pos_weight` (C) weighs each class's positive term."""
    target = multi_hot(targets, logits.shape[1]) if targets.ndim == 1 else targets.float()
    if smoothing:
        target = target * (1 - smoothing) + smoothing / 2
    weight = None if pos_weight is None else pos_weight.to(logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight)


def balanced_pos_weight(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class: negatives / positives on the train labels (a class without positives weighs 1)."""
    hot = multi_hot(labels, num_classes)
    positives = hot.sum(0)
    weight = (len(hot) - positives) / positives.clamp_min(1)
    return torch.where(positives > 0, weight, torch.ones_like(weight))


class WeightedBce:
    """The training loss with trainer.pos_weight=balanced (engine.Loss): BCE with the train split's weights."""

    def __init__(self, pos_weight: torch.Tensor) -> None:
        self.pos_weight = pos_weight

    def __call__(
        self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, settings: Any
    ) -> torch.Tensor:
        return bce(logits, targets, settings.label_smoothing, self.pos_weight)


def label_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image, the share of its C yes/no decisions (at probability 1/2) that are right: the multi-label
    accuracy reported as train_acc and val_acc."""
    return ((logits > 0) == (multi_hot(targets, logits.shape[1]) > 0)).float().mean(1)


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per class, average precision (the area under the precision-recall curve as scikit-learn computes it:
    the mean of the precision at each positive, ties broken by order); NaN for a class without positives."""
    order = scores.argsort(0, descending=True)
    hits = truth.gather(0, order)
    cumulative = hits.cumsum(0)
    precision = cumulative / torch.arange(1, len(scores) + 1, dtype=torch.float64).unsqueeze(1)
    positives = hits.sum(0)
    ap = (precision * hits).sum(0) / positives.clamp_min(1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def decision_counts(probabilities: torch.Tensor, truth: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per class: true positives, predicted positives, actual positives (3 x C)."""
    predicted = (probabilities >= thresholds).double()
    return torch.stack([(predicted * truth).sum(0), predicted.sum(0), truth.sum(0)])


def scores(logits: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor | None = None) -> dict[str, Any]:
    """mAP, micro and macro F1, micro precision and recall at `thresholds` (None: 1/2 for every class), and per
    class: AP, precision, recall, F1, support. mAP averages the classes that have positives."""
    count = logits.shape[1]
    probabilities = logits.double().sigmoid()
    truth = multi_hot(targets, count).double()
    cut = torch.full((count,), DEFAULT_THRESHOLD, dtype=torch.float64) if thresholds is None else thresholds.double()
    ap = average_precision(probabilities, truth)
    tp, predicted, actual = decision_counts(probabilities, truth, cut)
    precision, recall = tp / predicted.clamp_min(1), tp / actual.clamp_min(1)
    f1 = 2 * tp / (predicted + actual).clamp_min(1)
    micro = 2 * tp.sum() / (predicted.sum() + actual.sum()).clamp_min(1)
    present = ~ap.isnan()
    return {
        "map": ap[present].mean().item() if present.any() else float("nan"),
        "f1_micro": micro.item(),
        "f1_macro": f1.mean().item(),
        "precision": (tp.sum() / predicted.sum().clamp_min(1)).item(),
        "recall": (tp.sum() / actual.sum().clamp_min(1)).item(),
        "per_class": {
            "ap": ap.tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": [int(n) for n in actual.tolist()],
            "threshold": cut.tolist(),
        },
    }


def tune_thresholds(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per class, the probability threshold with the best F1 on these (val) logits: each candidate is a score
    the class takes, the midpoint to the next lower score is kept, so a slightly lower test score still counts.
    A class without positives on val keeps 1/2."""
    probabilities = logits.double().sigmoid()
    truth = multi_hot(targets, logits.shape[1]).double()
    thresholds = []
    for k in range(logits.shape[1]):
        p, order = probabilities[:, k].sort(descending=True)
        hits = truth[order, k]
        if not hits.sum():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        tp = hits.cumsum(0)
        f1 = 2 * tp / (torch.arange(1, len(p) + 1, dtype=torch.float64) + hits.sum())
        best = int(f1.argmax())
        lower = p[best + 1] if best + 1 < len(p) else torch.tensor(0.0, dtype=torch.float64)
        thresholds.append(float((p[best] + lower) / 2))
    return thresholds


def decide(logits: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (sigmoid) and the yes/no decision of every class of every image."""
    probabilities = logits.float().sigmoid()
    return probabilities, probabilities >= torch.tensor(thresholds, dtype=torch.float32)


def stratum(labels: torch.Tensor) -> torch.Tensor:
    """One class per image for stratified splits and CV folds: the label itself, or for multi-hot rows the
    image's rarest label (its least frequent positive class; an image without labels: class -1 counted as one
    more stratum). An approximation of iterative stratification (Sechidis et al., 2011) that keeps every
    rare class on both sides where it can."""
    if labels.ndim == 1:
        return labels
    hot = labels >= 0.5
    frequency = hot.sum(0).float()
    rarity = torch.where(hot, frequency.expand_as(hot), torch.full_like(hot, float("inf"), dtype=torch.float32))
    rarest = rarity.argmin(1)
    return torch.where(hot.any(1), rarest, torch.full_like(rarest, labels.shape[1]))


def epoch_figures(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """A split's multi-label figures besides the loss, at probability 1/2: acc (right yes/no decisions), map,
    f1_micro, f1_macro, precision, recall (per-epoch validation rows: val_map, ...)."""
    figures = scores(logits, targets)
    figures.pop("per_class")
    return {"acc": label_hits(logits, targets).mean().item(), **figures}


def as_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """The logits whose sigmoid gives `probabilities` (clamped away from 0 and 1): a fused ensemble's output."""
    p = probabilities.float().clamp(1e-7, 1 - 1e-7)
    return p.log() - (-p).log1p()
