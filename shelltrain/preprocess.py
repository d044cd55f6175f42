"""What a trained model expects of its inputs, and how a batch prepared for another model is brought to it.

`Preprocessing` is the record every checkpoint carries (`preprocessing`: image size, channels, mean/std, and how
images were resized: scaled with `interpolation` and `antialias` until they cover the image size, keeping their
aspect ratio, then center-cropped to it; a square size scales the shorter side). The size is (height, width), an
int in the checkpoint for a square one (imagesize.plain_size), so a model trained at [H, W] is fed H x W images
wherever it is used.
`InputAdapter` lets a model trained with one preprocessing take batches made for another, e.g. ensemble members or
a teacher trained at 16 px in a run at 32 px: undo the run's normalization, resize, apply the model's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shelltrain.errors import UserError
from shelltrain.imagesize import covering, plain_size, size_hw, size_text

INTERPOLATION = "bilinear"  # data.transforms.fit_size: torchvision's resize default
ANTIALIAS = True


@dataclass(frozen=True)
class Preprocessing:
    image_size: tuple[int, int]  # (height, width); an int or [H, W] given here becomes that
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = INTERPOLATION
    antialias: bool = ANTIALIAS

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", size_hw(self.image_size, "preprocessing.image_size"))

    @classmethod
    def of_checkpoint(cls, checkpoint: dict[str, Any]) -> Preprocessing:
        """The preprocessing a checkpoint records (older ones: taken from their data config and first convolution)."""
        pre = dict(checkpoint.get("preprocessing") or {})
        data = (checkpoint.get("config") or {}).get("data") or {}
        for key in ("image_size", "mean", "std"):
            if pre.get(key) is None:
                pre[key] = data.get(key)
        if not pre.get("channels"):
            first_conv = (t.shape[1] for t in (checkpoint.get("model") or {}).values() if getattr(t, "ndim", 0) == 4)
            pre["channels"] = next(first_conv, 3)
        if pre["image_size"] is None or pre["mean"] is None or pre["std"] is None:
            raise UserError(
                "model.weights: this checkpoint does not record its preprocessing (an older shelltrain); retrain it"
            )
        return cls(
            size_hw(pre["image_size"], "model.weights: the checkpoint's image size"),
            int(pre["channels"]),
            tuple(float(v) for v in pre["mean"]),
            tuple(float(v) for v in pre["std"]),
            str(pre.get("interpolation") or INTERPOLATION),
            bool(pre.get("antialias", ANTIALIAS)),
        )

    @classmethod
    def of_data(cls, data: Any) -> Preprocessing:
        """The preprocessing of a built data bundle (data.DataBundle): what a model trained on it expects."""
        return cls(size_hw(data.image_size), int(data.in_channels), tuple(data.mean), tuple(data.std))

    def as_dict(self) -> dict[str, Any]:
        """Plain values, as checkpoints and exported files store them."""
        return {
            **asdict(self),
            "image_size": plain_size(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image: channels x height x width."""
        return (self.channels, *self.image_size)

    def pictures(self, images: torch.Tensor) -> list[np.ndarray]:
        """A batch normalized this way (N x C x H x W) as pictures to look at: H x W x C arrays in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return [(image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() for image in images]

    def same_inputs(self, other: Preprocessing) -> bool:
        """Whether a batch prepared as `other` is what this model was trained on (to float rounding)."""
        close = all(abs(a - b) < 1e-6 for a, b in zip((*self.mean, *self.std), (*other.mean, *other.std)))
        plain = (self.image_size, self.channels, len(self.mean), self.interpolation, self.antialias)
        return close and plain == (
            other.image_size,
            other.channels,
            len(other.mean),
            other.interpolation,
            other.antialias,
        )

    def describe(self) -> str:
        channel = "1 channel" if self.channels == 1 else f"{self.channels} channels"
        mean, std = ", ".join(f"{v:.3g}" for v in self.mean), ", ".join(f"{v:.3g}" for v in self.std)
        return f"{size_text(self.image_size)} px, {channel}, mean [{mean}], std [{std}]"


class InputAdapter(nn.Module):
    """`model` fed batches normalized as `given`: each is un-normalized, resized to the model's size (its
    interpolation and antialiasing; scaled to cover its height x width, keeping the aspect ratio, and center-cropped,
    as its own images were) and normalized with the model's own mean and std, in float32."""

    def __init__(self, model: nn.Module, given: Preprocessing, wanted: Preprocessing):
        super().__init__()
        self.model, self.size = model, wanted.image_size
        self.interpolation, self.antialias = wanted.interpolation, wanted.antialias
        for name, values in (("given_mean", given.mean), ("given_std", given.std)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1))
        for name, values in (("wanted_mean", wanted.mean), ("wanted_std", wanted.std)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.float() * self.given_std + self.given_mean
        have = (images.shape[-2], images.shape[-1])
        if have != self.size:
            antialias = self.antialias and self.interpolation in ("bilinear", "bicubic")
            scaled = covering(have, self.size)
            images = F.interpolate(images, size=scaled, mode=self.interpolation, antialias=antialias)
            top, left = round((scaled[0] - self.size[0]) / 2), round((scaled[1] - self.size[1]) / 2)
            images = images[..., top : top + self.size[0], left : left + self.size[1]]
        return self.model(((images - self.wanted_mean) / self.wanted_std).to(x.dtype))
