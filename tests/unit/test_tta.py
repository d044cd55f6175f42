"""Test-time augmentation: each image evaluated in every view, the logits averaged."""

from __future__ import annotations

import torch
from torch import nn

from shelltrain.engine import predict
from shelltrain.schema import defaults
from shelltrain.tta import tta_views, with_tta


class LeftRight(nn.Module):
    """Logits (sum of the left half, sum of the right half): flipping the image swaps them."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        half = images.shape[-1] // 2
        return torch.stack([images[..., :half].sum((1, 2, 3)), images[..., half:].sum((1, 2, 3))], dim=1)


def test_hflip_evaluates_each_image_twice_and_averages():
    images = torch.zeros(3, 1, 4, 4)
    images[..., :2] = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)  # the left half only
    model = LeftRight()
    logits = with_tta(model, "hflip")(images)
    assert len(model.seen) == 2 and torch.equal(model.seen[0], images) and torch.equal(model.seen[1], images.flip(-1))
    plain = LeftRight()(images)
    assert torch.allclose(logits, (plain + plain.flip(1)) / 2)  # both classes equally likely once mirrored
    assert torch.allclose(logits[:, 0], logits[:, 1]) and not torch.allclose(plain[:, 0], plain[:, 1])


def test_tta_through_predict_and_none_is_the_model_itself():
    images = torch.rand(5, 1, 8, 8)
    loader = [(images, torch.zeros(5, dtype=torch.long))]
    settings = defaults("trainer", device=torch.device("cpu"), channels_last=False)
    model = LeftRight()
    assert with_tta(model, "none") is model
    logits, _ = predict(with_tta(model, "hflip"), loader, settings)
    expected = (LeftRight()(images) + LeftRight()(images.flip(-1))) / 2
    assert torch.allclose(logits, expected)


def test_five_crop_gives_five_views_of_the_input_size():
    images = torch.arange(64.0).view(1, 1, 8, 8)
    views = tta_views(images, "five_crop")
    assert len(views) == 5 and all(v.shape == images.shape for v in views)
    assert views[0][0, 0, 0, 0] < views[3][0, 0, -1, -1]  # top-left corner crop vs bottom-right
