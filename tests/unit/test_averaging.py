"""trainer.ema: the averaged weights follow the EMA recurrence, computed here by hand."""

from __future__ import annotations

import torch
from torch import nn

from shelltrain.averaging import EmaAverager, start_weight
from shelltrain.engine import TrainState
from shelltrain.schema import EmaConfig, defaults


def _train_with_ema(ema: EmaConfig, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SGD steps on a tiny model with BatchNorm; the weights after each step and the averaged weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    averager = EmaAverager(model, val_loader=None, settings=defaults("trainer", device="cpu"), ema=ema)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    weights = []
    for step in range(1, steps + 1):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        weights.append(model[1].weight.detach().clone())
        averager.on_step(TrainState(step=step))
    return weights, averager.averaged.module[1].weight.detach()


def test_ema_follows_the_recurrence_by_hand():
    weights, averaged = _train_with_ema(defaults("trainer.ema", decay=0.8, warmup=False), steps=4)
    expected = weights[0]  # the first update copies the weights
    for w in weights[1:]:
        expected = 0.8 * expected + 0.2 * w
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert not torch.allclose(averaged, weights[-1], atol=1e-3)  # an average, not the last weights


def test_ema_every_n_steps_and_warmup():
    ema = defaults("trainer.ema", decay=0.8, every_n_steps=2, warmup=False, warmup_steps=8)
    weights, averaged = _train_with_ema(ema, steps=6)
    expected = weights[1]  # updates at steps 2, 4, 6; the decay at step t is 0.8 * t / 8
    for step in (4, 6):
        decay = 0.8 * step / 8
        expected = decay * expected + (1 - decay) * weights[step - 1]
    assert torch.allclose(averaged, expected, atol=1e-6)


def test_ema_warms_up_as_timm_by_default():
    """The packaged default: the decay at step t is min(decay, (1 + t) / (10 + t)), so early updates weigh the new
    weights most; with decay 0.999 and 30 steps the first weights keep under 1% of the average."""
    weights, averaged = _train_with_ema(defaults("trainer.ema", decay=0.999), steps=5)
    expected = weights[0]
    for step, w in enumerate(weights[1:], start=2):
        decay = min(0.999, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * w
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert start_weight(defaults("trainer.ema", decay=0.999), 30) < 0.01
    assert start_weight(defaults("trainer.ema", decay=0.999, warmup=False), 30) > 0.97  # 0.999 ** 29
