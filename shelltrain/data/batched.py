"""Batched forms of the geometric and colour augmentations, for `data.on_device` (device.py): each image of a
uint8 N x C x H x W batch draws its own parameters, from the same distributions as the torchvision transform
(torch's RNG on the batch's device, which the engine seeds per epoch and a checkpoint restores).

A warp (`RandomRotation`, `RandomAffine` with rotation/scale/translation, `RandomResizedCrop` to data.image_size)
is one affine grid and one grid_sample per batch; `ColorJitter` applies brightness, contrast, saturation and hue
in that order (torchvision draws a random order per image: the same factors, a slightly different composition).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as nnf
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from shelltrain.imagesize import size_hw


def _uniform(batch: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(batch, device=device).uniform_(low, high)


class Warp:
    """Per image: rotate by U(degrees), scale by U(scale), shift by round(U(-t, t) x size) pixels (RandomAffine,
    RandomRotation); outside pixels take `fill`. `mode`: "nearest" or "bilinear"."""

    def __init__(self, degrees: tuple[float, float], translate, scale, mode: str, fill: int):
        self.degrees, self.translate, self.scale, self.mode, self.fill = degrees, translate, scale, mode, fill

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        angle = _uniform(batch, *self.degrees, device) * math.pi / 180
        scale = _uniform(batch, *self.scale, device) if self.scale else torch.ones(batch, device=device)
        shift = torch.zeros(batch, 2, device=device)
        if self.translate:
            for axis, (reach, size) in enumerate(((self.translate[0], width), (self.translate[1], height))):
                pixels = _uniform(batch, -reach * size, reach * size, device).round()
                shift[:, axis] = 2 * pixels / size  # in grid units ([-1, 1] spans the image)
        # output -> source: inverse of (rotate by angle, scale, then shift); torchvision turns counter-clockwise.
        # The turn is in pixels: grid units span width and height, so a non-square image scales its off-diagonal.
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        aspect = height / width
        theta = torch.stack([torch.stack([cos, -sin * aspect], 1), torch.stack([sin / aspect, cos], 1)], 1)
        theta = torch.cat([theta, -(theta @ shift[:, :, None])], 2)
        return _sample(images, theta, self.mode, self.fill)


class ResizedCrop:
    """RandomResizedCrop to the image's own size: per image an area fraction U(scale) and a log-uniform aspect
    ratio, redrawn (up to 10 times) until the box fits, else the whole image; the box's place is uniform."""

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float], mode: str):
        self.scale, self.ratio, self.mode = scale, ratio, mode

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        box_w = torch.full((batch,), float(width), device=device)
        box_h = torch.full((batch,), float(height), device=device)
        pending = torch.ones(batch, dtype=torch.bool, device=device)
        for _ in range(10):
            area = _uniform(batch, *self.scale, device) * height * width
            ratio = torch.exp(_uniform(batch, math.log(self.ratio[0]), math.log(self.ratio[1]), device))
            w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
            fits = pending & (w > 0) & (h > 0) & (w <= width) & (h <= height)
            box_w, box_h = torch.where(fits, w, box_w), torch.where(fits, h, box_h)
            pending &= ~fits
        left = (torch.rand(batch, device=device) * (width - box_w + 1)).floor()
        top = (torch.rand(batch, device=device) * (height - box_h + 1)).floor()
        # output grid [-1, 1] -> the box, in source grid units (align_corners=False)
        center_x = (2 * left + box_w) / width - 1
        center_y = (2 * top + box_h) / height - 1
        zero = torch.zeros(batch, device=device)
        theta = torch.stack(
            [torch.stack([box_w / width, zero, center_x], 1), torch.stack([zero, box_h / height, center_y], 1)], 1
        )
        return _sample(images, theta, self.mode, 0)


def _sample(images: torch.Tensor, theta: torch.Tensor, mode: str, fill: int) -> torch.Tensor:
    """grid_sample of uint8 images through per-image 2 x 3 affine maps (output -> source), back to uint8."""
    grid = nnf.affine_grid(theta, list(images.shape), align_corners=False)
    pixels = images.float()
    if fill:
        pixels = pixels - fill  # zeros padding then fills with `fill`
    out = nnf.grid_sample(pixels, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return (out + fill).round().clamp(0, 255).to(torch.uint8)


class Jitter:
    """ColorJitter with a factor per image: brightness, contrast and saturation U(range), hue shift U(range)
    (saturation and hue leave grey images alone, as torchvision does)."""

    def __init__(self, brightness, contrast, saturation, hue):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels = images.shape[:2]
        device = images.device
        pixels = images.float() / 255
        if self.brightness is not None:
            pixels = (pixels * _uniform(batch, *self.brightness, device)[:, None, None, None]).clamp(0, 1)
        if self.contrast is not None:
            mean = _grey(pixels).mean(dim=(1, 2, 3), keepdim=True)
            pixels = _blend(pixels, mean, _uniform(batch, *self.contrast, device))
        if self.saturation is not None and channels == 3:
            pixels = _blend(pixels, _grey(pixels), _uniform(batch, *self.saturation, device))
        if self.hue is not None and channels == 3:
            hsv = _rgb_to_hsv(pixels)
            shift = _uniform(batch, *self.hue, device)[:, None, None]
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            pixels = _hsv_to_rgb(hsv)
        return (pixels * 255).round().clamp(0, 255).to(torch.uint8)


def _grey(pixels: torch.Tensor) -> torch.Tensor:
    return pixels if pixels.shape[1] == 1 else F.rgb_to_grayscale(pixels)


def _blend(pixels: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor[:, None, None, None]
    return (factor * pixels + (1 - factor) * other).clamp(0, 1)


def batched_form(transform: v2.Transform, size: Any) -> Warp | ResizedCrop | Jitter | None:
    """The batched form of a warp or colour transform for images of `size` (data.image_size); None when it has
    none (shear, expand, a fixed center, a crop to another size)."""
    mode = str(getattr(getattr(transform, "interpolation", None), "value", "nearest"))
    if mode not in ("nearest", "bilinear"):
        return None
    fill = getattr(transform, "fill", 0)
    fill = int(fill) if isinstance(fill, (int, float)) else None  # a per-type fill dict: no batched form
    if isinstance(transform, v2.RandomRotation) and not transform.expand and transform.center is None:
        return None if fill is None else Warp(tuple(transform.degrees), None, None, mode, fill)
    if isinstance(transform, v2.RandomAffine) and transform.shear is None and transform.center is None:
        return (
            None if fill is None else Warp(tuple(transform.degrees), transform.translate, transform.scale, mode, fill)
        )
    if isinstance(transform, v2.RandomResizedCrop) and tuple(transform.size) == size_hw(size):
        return ResizedCrop(tuple(transform.scale), tuple(transform.ratio), mode)
    if isinstance(transform, v2.ColorJitter):
        return Jitter(transform.brightness, transform.contrast, transform.saturation, transform.hue)
    return None
