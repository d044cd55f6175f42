"""The engine on a tiny linear model and random tensors, with the trainer schema (TrainerConfig) as its settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shelltrain.engine import Callback, TrainState, fit, make_scaler, train_one_epoch
from shelltrain.schema import TrainerConfig, defaults


def _data(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())  # linearly separable


def _loader(batch_size: int, n: int = 64) -> DataLoader:
    return DataLoader(_data(n), batch_size=batch_size, shuffle=False)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def _settings(**values) -> TrainerConfig:
    return defaults("trainer", device="cpu", channels_last=False, **values)


def _fit(model: nn.Module, batch_size: int, lr: float, callbacks=None, **values) -> TrainState:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = _loader(batch_size)
    return fit(model, loader, _loader(32), optimizer, None, _settings(**values), callbacks=callbacks)


def test_fit_reduces_the_loss():
    state = _fit(_model(), batch_size=16, lr=0.5, epochs=5)
    assert [row["epoch"] for row in state.history] == [1, 2, 3, 4, 5]
    assert state.history[-1]["train_loss"] < 0.7 * state.history[0]["train_loss"]
    assert state.history[-1]["val_acc"] > 0.8


def test_accumulate_two_equals_one_double_batch_step():
    accumulated, double = _model(), _model()
    _fit(accumulated, batch_size=8, lr=0.3, epochs=1, accumulate=2, limit_train_batches=2)
    _fit(double, batch_size=16, lr=0.3, epochs=1, limit_train_batches=1)
    for a, b in zip(accumulated.parameters(), double.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_grad_clip_bounds_the_update():
    def update_norm(clip: float) -> float:
        model = _model()
        with torch.no_grad():
            model.weight.mul_(-10.0)  # confidently wrong: a large gradient
        before = copy.deepcopy(model)
        _fit(model, batch_size=64, lr=1.0, epochs=1, grad_clip=clip, limit_train_batches=1)
        deltas = [(a - b).flatten() for a, b in zip(model.parameters(), before.parameters())]
        return torch.cat(deltas).norm().item()

    assert update_norm(0.0) > 0.5  # unclipped, plain SGD with lr 1 moves by the gradient norm
    assert update_norm(0.1) == pytest.approx(0.1, rel=1e-4)


def test_early_stopping_after_patience_epochs_without_improvement():
    state = _fit(_model(), batch_size=16, lr=0.0, epochs=10, patience=2, monitor="val_loss")  # lr 0: no change
    assert state.stopped_early and state.epoch == 3 and state.best_epoch == 1


def test_limit_train_batches_caps_every_epoch():
    class Record(Callback):
        def __init__(self):
            self.starts, self.batches = [], []

        def on_epoch_start(self, epoch: int, num_batches: int) -> None:
            self.starts.append(num_batches)

        def on_batch_end(self, batch: int, loss: float, acc: float, images_per_second: float) -> None:
            self.batches.append(batch)

    record = Record()
    state = _fit(_model(), batch_size=8, lr=0.1, callbacks=[record], epochs=2, limit_train_batches=3)
    assert record.starts == [3, 3] and record.batches == [3, 3] and state.step == 6


def test_a_torch_device_in_the_settings_works_as_well():
    model = _model()
    settings = _settings(epochs=1, limit_train_batches=1)
    settings.device = torch.device("cpu")  # what the runner puts there once the device is resolved
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    row = train_one_epoch(model, _loader(8), optimizer, None, settings, state, 1, Callback(), make_scaler(settings))
    assert row is not None and state.step == 1
