"""Exponential moving average of the weights (trainer.ema): an engine Callback that keeps a
torch.optim.swa_utils.AveragedModel beside the model, updates it after optimizer steps, validates it each epoch
(`ema_val_loss`, `ema_val_acc` in the epoch's row, so trainer.monitor can select by it) and hands its state to
the checkpoints, so a resumed run continues the same average.

BatchNorm buffers are averaged like the weights (`use_buffers=True`): the averaged model's running statistics
follow the averaged weights' history instead of the last step's, and no extra pass over the data is needed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from shelltrain.checkpoint import load_checkpoint
from shelltrain.engine import Callback, TrainState, evaluate, predict
from shelltrain.metrics import split_metrics
from shelltrain.schema import EmaConfig, TrainerConfig
from shelltrain.tta import with_tta


class EmaAverager(Callback):
    """EMA_0 = W_1 (the weights after the first update step), then EMA = d * EMA + (1 - d) * W every
    `every_n_steps` optimizer steps. With `warmup_steps` W > 0 the decay at step t is d * min(1, t / W): early
    averages follow the fast-moving weights instead of remembering the random start."""

    def __init__(self, model: nn.Module, val_loader: DataLoader, settings: TrainerConfig, ema: EmaConfig):
        self.model = model
        self.val_loader = val_loader
        self.settings = settings
        self.ema = ema
        self.decay = float(ema.decay)
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], count: Any) -> None:
        get_ema_multi_avg_fn(self.decay)(averaged, current, count)

    def on_step(self, state: TrainState) -> None:
        if state.step % self.ema.every_n_steps:
            return
        if self.ema.warmup_steps > 0:
            self.decay = float(self.ema.decay) * min(1.0, state.step / self.ema.warmup_steps)
        self.averaged.update_parameters(self.model)

    def on_validation_end(self, row: dict[str, float]) -> None:
        val = evaluate(self.averaged.module, self.val_loader, self.settings, limit=self.settings.limit_val_batches)
        row["ema_val_loss"], row["ema_val_acc"] = val["loss"], val["acc"]

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def build_averager(
    ema: EmaConfig, model: nn.Module, val_loader: DataLoader, settings: TrainerConfig, payload: dict[str, Any] | None
) -> EmaAverager | None:
    """The EMA callback when trainer.ema.decay is set, continuing the average a resumed checkpoint carries."""
    if ema.decay is None:
        return None
    averager = EmaAverager(model, val_loader, settings, ema)
    if payload is not None and payload.get("ema") is not None:
        averager.load_state_dict(payload["ema"])
    return averager


def ema_test_metrics(
    model: nn.Module, test_loader: DataLoader, settings: TrainerConfig, best: Path, best_row: dict[str, Any]
) -> dict[str, float]:
    """summary.json's EMA figures: the averaged weights best.pt carries (those of the selected epoch) on the test
    split (`ema_test_acc`, `ema_test_loss`), and their validation figures at that epoch; {} without EMA."""
    ema = load_checkpoint(best).get("ema") if best.exists() else None
    if ema is None:
        return {}
    averaged = copy.deepcopy(model)
    averaged.load_state_dict({key.removeprefix("module."): v for key, v in ema.items() if key.startswith("module.")})
    tested = with_tta(averaged, settings.test_tta)
    logits, targets = predict(tested, test_loader, settings, limit=settings.limit_test_batches)
    best_val = {f"best_{key}": best_row[key] for key in ("ema_val_acc", "ema_val_loss") if key in best_row}
    return {**split_metrics(logits, targets, settings, "ema_test"), **best_val}
