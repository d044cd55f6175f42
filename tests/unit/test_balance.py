"""data.imbalance (a long-tailed train split) and data.balance (an inverse-frequency sampler or loss weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from shelltrain.data import build_data
from shelltrain.data.balance import BalancedSampler, WeightedLoss, class_weights, long_tail
from shelltrain.errors import UserError
from shelltrain.schema import validate


def _counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def test_long_tail_sizes_decay_geometrically_by_the_factor():
    labels = torch.arange(10).repeat_interleave(100)
    index = torch.arange(len(labels))
    kept = long_tail(labels, index, 10.0, seed=0)
    sizes = _counts(labels[kept], 10)
    assert sizes == [round(100 * 10 ** (-k / 9)) for k in range(10)]
    assert sizes[0] / sizes[-1] == 10
    assert torch.equal(kept, long_tail(labels, index, 10.0, seed=0))  # seeded
    assert not torch.equal(kept, long_tail(labels, index, 10.0, seed=1))


def test_imbalance_shapes_only_the_train_split_of_a_dataset():
    plain = build_data(compose_config("data.image_size=8").data, compose_config().augmentation, 0)
    cfg = compose_config("data.image_size=8", "data.imbalance=10")
    tailed = build_data(cfg.data, cfg.augmentation, 0)
    sizes = _counts(tailed.train.dataset.labels, 10)
    smallest_before = min(_counts(plain.train.dataset.labels, 10))
    assert sizes[0] == smallest_before and math.isclose(sizes[0] / sizes[-1], 10, rel_tol=0.1)
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    for split in ("val", "test"):
        assert torch.equal(getattr(tailed, split).dataset.labels, getattr(plain, split).dataset.labels)


def test_sampler_draws_the_classes_about_equally():
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    sampler = BalancedSampler(labels, seed=0)
    drawn = labels[list(sampler)]
    assert len(drawn) == 1000 and abs(drawn.float().mean().item() - 0.5) < 0.05
    sampler.set_epoch(0)
    first = list(sampler)
    assert labels[first].tolist() == drawn.tolist()
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # a function of (seed, epoch, rank): resumes replay it


def test_sampler_under_ddp_gives_each_rank_its_own_share():
    labels = torch.arange(4).repeat_interleave(25)
    ranks = [BalancedSampler(labels, seed=0, rank=r, world=2) for r in range(2)]
    draws = [list(s) for s in ranks]
    assert [len(d) for d in draws] == [50, 50] and draws[0] != draws[1]


def test_loader_uses_the_balanced_sampler():
    cfg = compose_config("data.image_size=8", "data.imbalance=10", "data.balance=sampler")
    bundle = build_data(cfg.data, cfg.augmentation, 0)
    assert isinstance(bundle.train.sampler, BalancedSampler)
    labels = torch.cat([y for _, y in bundle.train])
    counts = torch.bincount(labels, minlength=10).float()
    assert counts.min() / counts.max() > 0.5  # about equal, though the split is 10:1


def test_loss_weights_are_inverse_frequency():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    weights = class_weights(labels, 3)
    counts = torch.tensor([60.0, 30.0, 10.0])
    assert torch.allclose(weights * counts, torch.full((3,), 100 / 3))
    logits, targets = torch.randn(8, 3), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2])
    expected = F.cross_entropy(logits, targets, weight=weights)
    got = WeightedLoss(weights)(logits, logits, targets, compose_config().trainer)
    assert torch.allclose(got, expected)


def test_loss_weights_move_to_the_device_once():
    """The class weights go to the logits' device at the first step and stay there: no copy every step (the meta
    device stands in for a GPU)."""
    loss = WeightedLoss(class_weights(torch.tensor([0, 0, 1, 2]), 3))
    settings = compose_config().trainer
    logits, targets = torch.randn(4, 3, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    loss(logits, logits, targets, settings)
    moved = loss.weights
    assert moved.device.type == "meta"
    loss(logits, logits, targets, settings)
    assert loss.weights is moved


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.balance=loss_weights", "trainer.loss=mse"], "trainer.loss"),
        (["data.balance=sampler", "data.on_device=true"], "data.on_device"),
        (["data.balance=sampler", "cv.folds=3"], "cross-validation"),
        (["data.imbalance=0.5"], "data.imbalance"),
        (["data.balance=oversample"], "data.balance"),
    ],
)
def test_bad_combinations_are_one_line_errors(overrides, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate(compose_config(*overrides))
