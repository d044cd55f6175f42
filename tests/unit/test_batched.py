"""Batched on-device augmentations: shape, dtype and range, a draw per image, and determinism under a seed."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from shelltrain.data.batched import batched_form

SIZE = 16
TRANSFORMS = {
    "rotation": v2.RandomRotation(30),
    "affine": v2.RandomAffine(15, translate=[0.1, 0.1], scale=[0.8, 1.2]),
    "resized_crop": v2.RandomResizedCrop(SIZE, antialias=True),
    "jitter": v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
}


def images(batch: int = 32, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, channels, SIZE, SIZE), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_batched_augmentation_keeps_shape_and_range_and_draws_per_image(name):
    op = batched_form(TRANSFORMS[name], SIZE)
    assert op is not None
    batch = images()[:1].expand(32, -1, -1, -1).contiguous()  # one image 32 times: outputs differ per image
    torch.manual_seed(0)
    out = op(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    distinct = {out[i].numpy().tobytes() for i in range(len(out))}
    assert len(distinct) > 16


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_batched_augmentation_is_a_function_of_the_seed(name):
    op = batched_form(TRANSFORMS[name], SIZE)
    torch.manual_seed(3)
    first = op(images())
    torch.manual_seed(3)
    assert torch.equal(op(images()), first)
    torch.manual_seed(4)
    assert not torch.equal(op(images()), first)


def test_identity_settings_leave_images_unchanged():
    batch = images()
    still = batched_form(v2.RandomAffine(0), SIZE)
    assert torch.equal(still(batch), batch)
    whole = batched_form(v2.RandomResizedCrop(SIZE, scale=(1, 1), ratio=(1, 1)), SIZE)
    assert torch.equal(whole(batch), batch)
    plain = batched_form(v2.ColorJitter(), SIZE)
    assert torch.equal(plain(batch), batch)


def test_jitter_of_grey_images_and_brightness_scale_like_torchvision():
    grey = images(channels=1)
    assert batched_form(v2.ColorJitter(saturation=0.5, hue=0.2), SIZE)(grey).equal(grey)
    torch.manual_seed(0)
    dark = batched_form(v2.ColorJitter(brightness=(0.5, 0.5)), SIZE)(images())
    expected = v2.functional.adjust_brightness(images(), 0.5)
    assert (dark.int() - expected.int()).abs().max() <= 1


def test_a_rotation_by_a_right_angle_moves_pixels_like_torchvision():
    batch = images()
    op = batched_form(v2.RandomRotation((90, 90)), SIZE)
    expected = v2.functional.rotate(batch, 90)
    assert (op(batch).int() - expected.int()).abs().float().mean() < 1


def test_transforms_without_a_batched_form():
    assert batched_form(v2.RandomAffine(10, shear=5), SIZE) is None
    assert batched_form(v2.RandomRotation(10, expand=True), SIZE) is None
    assert batched_form(v2.RandomResizedCrop(SIZE * 2), SIZE) is None
    assert batched_form(v2.GaussianBlur(3), SIZE) is None
