"""What the run's log says about the data it trains on beyond sizes: the augmentation, a long-tailed split's
per-class counts, an epoch too short to train (few images against a large batch), and the train/ images an image
folder without test/ or val/ gives up to those splits."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from shelltrain.data.balance import train_labels
from shelltrain.dataroot import data_root
from shelltrain.schema import TrainerConfig

FEW_STEPS = 10  # fewer optimizer steps per epoch than this draws a warning
WANTED_STEPS = 20  # the suggested batch size gives about this many


def training_notes(
    train: DataLoader, classes: list[str], data: DictConfig, augmentation: DictConfig, settings: TrainerConfig
) -> list[str]:
    """The lines the run's log gets about its train split: augmentation, per-class counts with data.imbalance, and
    a warning when an epoch has very few optimizer steps (a small data set with a large batch barely trains)."""
    lines = [describe_augmentation(augmentation)]
    labels = train_labels(train)
    if data.imbalance is not None and labels is not None:
        counts = torch.bincount(labels.cpu(), minlength=len(classes)).tolist()
        listed = ", ".join(f"{name} {count}" for name, count in zip(classes, counts))
        lines.append(f"data.imbalance={data.imbalance}: train images per class: {listed}")
    limited = settings.overfit_batches or settings.limit_train_batches  # a chosen short epoch is no trap
    steps = math.ceil(len(train) / settings.accumulate)
    if not limited and steps < FEW_STEPS:
        images = len(train.dataset)
        suggested = max(1, 2 ** int(math.log2(max(images // (WANTED_STEPS * settings.accumulate), 1))))
        accumulate = f" x trainer.accumulate={settings.accumulate}" if settings.accumulate > 1 else ""
        lines.append(
            f"warning: an epoch is only {steps} optimizer step(s) ({images} train images / data.batch_size="
            f"{data.batch_size}{accumulate}), too few to train well; set a smaller batch, e.g. "
            f"data.batch_size={suggested}, or more trainer.epochs"
        )
    return lines


def describe_augmentation(augmentation: DictConfig) -> str:
    """The augmentation option and its train transforms by name, mixup/cutmix when on."""
    names = [str(t.get("_target_", "?")).rsplit(".", 1)[-1] for t in augmentation.train or []]
    mixing = [f"{key}={augmentation[key]}" for key in ("mixup_alpha", "cutmix_alpha") if augmentation[key]]
    listed = ", ".join(names + mixing) or "no random transforms"
    return f"augmentation: {augmentation.name} ({listed})"


def carving_notes(data: DictConfig, splits: dict[str, int]) -> list[str]:
    """One line per split an image folder lacks (no test/ or val/ folder): how many train/ images were moved into
    it, never to be trained on, and how to keep them in training. `splits`: images per split as built."""
    if data.name != "imagefolder" or data.source is not None:
        return []
    root = data_root(data)
    lines = []
    for split in ("test", "val"):
        if (root / split).is_dir():
            continue
        stand_in = "val/" if split == "test" else "your own images"
        lines.append(
            f"data.root has no {split}/ folder: {splits[split]} of the images in train/ (data.{split}_fraction="
            f"{data[f'{split}_fraction']}) were moved to the {split} split and are not trained on; to train on all "
            f"of train/, add {str(data.root).rstrip('/')}/{split}/ (a copy or link of {stand_in} will do)"
        )
    return lines
