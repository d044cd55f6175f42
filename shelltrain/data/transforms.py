"""Per-image transforms: the resize to data.image_size every source gets, the normalization statistics
(configured, given by pretrained weights, or measured), the `augmentation.train` transforms and MixUp/CutMix."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shelltrain.data.sources import one_line
from shelltrain.errors import UserError
from shelltrain.imagesize import covering, size_hw, size_text

# Images drawn (seeded) from the train split to estimate mean/std when the config leaves them null.
_STATS_SAMPLES = 1000


def to_float_transforms(mean: tuple[float, ...], std: tuple[float, ...]) -> list[NormalizedFloat]:
    """uint8 image -> normalized float: what every split ends with (and what prediction feeds a model)."""
    return [NormalizedFloat(mean, std)]


class NormalizedFloat:
    """uint8 images (C x H x W, or a batch) -> float32 (x / 255 - mean) / std, as one multiply and one subtract.
    torchvision's ToDtype(scale=True) + Normalize give the same values (to float rounding) at ~10x the cost per
    64 px image (~90 us, Normalize rebuilding its mean/std tensors on every call), which the loader workers pay for
    every sample."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(self.std, dtype=torch.float64).view(-1, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).float()
        self.shift = (torch.tensor(self.mean, dtype=torch.float64).view(-1, 1, 1) / std_t).float()
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # already float (a user's transform converted it): scaled as ToDtype does
            return F.normalize(F.to_dtype(images, torch.float32, scale=True), self.mean, self.std)
        if images.device not in self._on:
            self._on[images.device] = (self.scale.to(images.device), self.shift.to(images.device))
        scale, shift = self._on[images.device]
        return images.to(torch.float32).mul_(scale).sub_(shift)

    def __repr__(self) -> str:
        return f"NormalizedFloat(mean={list(self.mean)}, std={list(self.std)})"


STATS_FROM = {"data config": "data.mean/data.std", "weights": "model.weights' own", "measured": "measured"}


def describe_preprocessing(bundle: Any, stats_from: str) -> str:
    """One log line: what every image of `bundle` (a DataBundle) becomes (size and how it was scaled, channels,
    normalization) and where each setting came from, so that a silent default (64 px RGB for a folder of 32 px
    grey PNGs) shows. `stats_from`: "data config", "weights" or "measured" (transfer.follow_weights)."""
    (height, width), sides = size_hw(bundle.image_size), bundle.native_sides
    size = min(height, width)
    if sides is None:
        scaled = ""
    elif sides[0] != sides[1]:
        scaled = f", scaled from {sides[0]}-{sides[1]} px"
    elif height != width:
        scaled = f", scaled and cropped from a {sides[0]} px shorter side"
    elif sides[0] == size:
        scaled = ", native size"
    else:
        scaled = f", {'upscaled' if sides[0] < size else 'downscaled'} from {sides[0]} px"
    channels = {1: "1 channel (grey", 3: "3 channels (RGB"}.get(bundle.in_channels, f"{bundle.in_channels} channels (")
    values = ", ".join(f"{m:.4g}/{s:.4g}" for m, s in zip(bundle.mean, bundle.std))
    return (
        f"preprocessing: {size_text(bundle.image_size)} px (data.image_size{scaled}), {channels}, "
        f"{bundle.channels_from}), "
        f"mean/std {values} ({STATS_FROM.get(stats_from, stats_from)})"
    )


def fit_size(images: torch.Tensor, size: Any) -> torch.Tensor:
    """Scale (antialiased, keeping the aspect ratio) until the images cover `size` (an int: a square, or
    [height, width]: imagesize.size_hw), then center-crop to it: for a square size, the shorter side becomes `size`."""
    height, width = size_hw(size)
    have = (images.shape[-2], images.shape[-1])
    if have == (height, width):
        return images
    return F.center_crop(F.resize(images, list(covering(have, size)), antialias=True), [height, width])


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[-3] == channels:
        return images
    return F.grayscale_to_rgb(images) if channels == 3 else F.rgb_to_grayscale(images)


def normalization_stats(
    data: DictConfig, channels: int, train: Dataset, given: tuple[list[float], list[float]] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The configured mean/std (one value serves every channel), else `given` ones (fitted to the channels), else
    per-channel ones measured on the train split."""
    if (data.mean is None or data.std is None) and given is not None:
        return _fit_channels(given[0], channels), _fit_channels(given[1], channels)
    if data.mean is None or data.std is None:
        return _measurestats(train, data.split_seed)
    stats = []
    for key in ("mean", "std"):
        values = [float(v) for v in data[key]]
        if len(values) not in (1, channels):
            raise UserError(
                f"data.{key}: {len(values)} values for {channels}-channel images; "
                f"give {channels} (or 1) or set data.{key}=null to measure it on the train split"
            )
        stats.append(tuple(values * channels if len(values) == 1 else values))
    if min(stats[1]) <= 0:
        raise UserError(f"data.std: got {list(stats[1])}; every value must be > 0")
    return stats[0], stats[1]


def _fit_channels(values: list[float], channels: int) -> tuple[float, ...]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return tuple(values)
    if len(values) == 1:
        return tuple(values * channels)
    return (sum(values) / len(values),) * channels  # RGB statistics for grey images: their average


def _measurestats(train: Dataset, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of un-augmented train images in [0, 1], from a seeded sample (own generator)."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:_STATS_SAMPLES]
    total = total_sq = 0
    for index in pick.tolist():
        pixels = train.load(index).flatten(1).double() / 255
        total = total + pixels.mean(1)
        total_sq = total_sq + pixels.pow(2).mean(1)
    mean = total / len(pick)
    # A channel that never varies would divide by zero; one intensity step keeps it finite.
    std = (total_sq / len(pick) - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


def augmentations(augmentation: DictConfig) -> list[v2.Transform]:
    transforms = []
    for i, node in enumerate(augmentation.train):
        try:
            transforms.append(instantiate(node, _convert_="all"))
        except Exception as e:  # hydra wraps import and argument errors; the cause says what is wrong
            raise UserError(
                f"augmentation.train[{i}]: cannot build {node.get('_target_')!r} ({one_line(e.__cause__ or e)}); "
                "fix its _target_ or arguments"
            ) from e
    return transforms


def dry_run(train: Dataset) -> None:
    """Run the train pipeline on one image now, so a transform that cannot handle these images fails here with
    a clear message; the global RNG is forked so that this leaves no trace."""
    with torch.random.fork_rng(devices=[]):
        try:
            train[0]
        except UserError:
            raise
        except Exception as e:  # any transform error is a config problem the user fixes in augmentation.train
            shape = tuple(train.load(0).shape)
            raise UserError(
                f"augmentation.train: fails on a {shape} uint8 image ({one_line(e)}); fix or remove that transform"
            ) from e


def mix_transform(augmentation: DictConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix of a whole batch (one of them per batch when both are on)."""
    mixes = []
    if augmentation.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=float(augmentation.mixup_alpha), num_classes=num_classes))
    if augmentation.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=float(augmentation.cutmix_alpha), num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
