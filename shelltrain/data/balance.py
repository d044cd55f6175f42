"""Class imbalance: `data.imbalance` makes a long-tailed train split from any dataset, so that the remedies can be
measured; `data.balance` is the remedy: `sampler` draws the train images with inverse-frequency weights
(`BalancedSampler`), `loss_weights` weights the cross-entropy by inverse class frequency (`class_weights`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, WeightedRandomSampler

from shelltrain.rng import epoch_seed


def long_tail(labels: torch.Tensor, index: torch.Tensor, factor: float, seed: int) -> torch.Tensor:
    """The subset of `index` (into `labels`) in which class k keeps n * factor ** (-k / (K - 1)) images (rounded,
    at least 1), n being the smallest class's count: sizes decay geometrically from class 0 to class K-1 by
    `factor`. Which images a class keeps is drawn with `seed`."""
    present = labels[index]
    num_classes = int(present.max().item()) + 1
    counts = torch.bincount(present, minlength=num_classes)
    head = int(counts[counts > 0].min().item())
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for k in range(num_classes):
        members = index[present == k]
        size = max(1, round(head * factor ** (-k / max(num_classes - 1, 1))))
        keep.append(members[torch.randperm(len(members), generator=generator)[:size]])
    return torch.cat(keep).sort().values


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced split gets weight 1 for every class: N / (K * n_k)."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)
    return (len(labels) / (num_classes * counts)).float()


class BalancedSampler(WeightedRandomSampler):
    """Draws (with replacement) each image with probability proportional to 1 / its class's count, so every class
    comes up about equally often. Under DDP each of `world` ranks draws its own ceil(N / world) indices; the draws
    are a function of (seed, epoch, rank) through `set_epoch`, which the engine calls every epoch, so a resumed run
    replays them."""

    def __init__(self, labels: torch.Tensor, seed: int, rank: int = 0, world: int = 1):
        counts = torch.bincount(labels).double()
        weights = 1.0 / counts[labels]
        generator = torch.Generator()
        super().__init__(weights, math.ceil(len(labels) / world), replacement=True, generator=generator)
        self.seed, self.rank = seed, rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))  # as the engine seeds each epoch


class WeightedLoss:
    """The training loss of data.balance=loss_weights: cross-entropy weighted by `weights` per class (hard or soft
    targets, with the trainer's label smoothing); validation keeps the engine's unweighted criterion. The weights
    move to the logits' device once, at the first step, not with a host-to-device copy every step."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(
        self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, settings: Any
    ) -> torch.Tensor:
        if self.weights.device != logits.device:
            self.weights = self.weights.to(logits.device)
        return F.cross_entropy(logits.float(), targets, weight=self.weights, label_smoothing=settings.label_smoothing)


def balanced_loss(balance: str, train: DataLoader, num_classes: int) -> WeightedLoss | None:
    """The training loss data.balance asks for: WeightedLoss with `loss_weights`, else None (the engine's)."""
    if balance != "loss_weights":
        return None
    return WeightedLoss(class_weights(train_labels(train).cpu(), num_classes))


def train_labels(train: DataLoader) -> torch.Tensor | None:
    """The train split's labels (a cross-validation fold's too); None for a data set that does not hold them."""
    dataset: Any = train.dataset
    if isinstance(dataset, Subset):  # a cross-validation fold of the train split
        labels = getattr(dataset.dataset, "labels", None)
        return None if labels is None else labels[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return getattr(dataset, "labels", None)
