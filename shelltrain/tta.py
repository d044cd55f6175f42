"""Test-time augmentation (evaluate.tta for task=evaluate, trainer.test_tta for a training run's final test):
the model sees each image in several views and its logits are averaged over them.

A training run's headline `test_acc` is always the model's own (no TTA), the figure `task=evaluate` gives without
evaluate.tta; the TTA figures are reported beside it with a `_tta` suffix (`test_acc_tta`, `test_loss_tta`, ...)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from shelltrain.engine import predict
from shelltrain.metrics import split_metrics
from shelltrain.schema import TrainerConfig

CROP_FRACTION = 0.875  # five_crop: each crop's side as a fraction of the image's, resized back to the image's size


class TTAModel(nn.Module):
    """`model` evaluated on every view of the batch (one forward per view), the logits averaged."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = [self.model(view) for view in tta_views(images, self.mode)]
        return torch.stack([v.float() for v in views]).mean(0)


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """hflip: the images and their mirror images; five_crop: four corner crops and the centre crop."""
    if mode == "hflip":
        return [images, images.flip(-1)]
    height, width = images.shape[-2:]
    h, w = max(1, round(height * CROP_FRACTION)), max(1, round(width * CROP_FRACTION))
    top, left = (height - h) // 2, (width - w) // 2
    corners = [(0, 0), (0, width - w), (height - h, 0), (height - h, width - w), (top, left)]
    crops = [images[..., y : y + h, x : x + w] for y, x in corners]
    return [F.interpolate(c, size=(height, width), mode="bilinear", align_corners=False) for c in crops]


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    """`model` itself for mode none, else its TTA wrapper."""
    return model if mode == "none" else TTAModel(model, mode)


def tested_with_tta(
    model: nn.Module, loader: DataLoader, settings: TrainerConfig, split: str
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """`model` on `loader`: `{split}_acc`, `{split}_loss`, ... of the model itself, and with trainer.test_tta the
    same figures under TTA beside them (`{split}_acc_tta`, ..., and `{split}_tta`, the mode), so a headline never
    silently changes meaning; returns the figures and the plain (logits, targets)."""
    logits, targets = predict(model, loader, settings, limit=settings.limit_test_batches)
    figures: dict[str, Any] = split_metrics(logits, targets, settings, split)
    if settings.test_tta != "none":
        views, _ = predict(with_tta(model, settings.test_tta), loader, settings, limit=settings.limit_test_batches)
        tta = split_metrics(views, targets, settings, split)
        figures.update({f"{key}_tta": value for key, value in tta.items()}, **{f"{split}_tta": settings.test_tta})
    return figures, logits, targets
