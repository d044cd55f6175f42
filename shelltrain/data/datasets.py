"""The image datasets every split becomes: uint8 images held in memory (a source's arrays, or a decoded cache) or
image files decoded as they are drawn. Both give a sample as (transformed image, label), and both take a
`SeededSampler` key (index, seed) so a sample's augmentation does not depend on the worker that draws it."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from shelltrain.data.loader import seeded
from shelltrain.data.sources import decode
from shelltrain.data.transforms import fit_size
from shelltrain.imagesize import size_hw


class TensorImages(Dataset):
    """uint8 N x C x H x W images held in memory, already at their final size, so a sample costs only its transform.
    `rows`: this split's rows of a larger (memory-mapped, data.cache=disk) array, read as they are drawn."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: v2.Transform | None,
        rows: torch.Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.transform, self.rows = images, labels, transform, rows

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        return self.images[index if self.rows is None else int(self.rows[index])]

    def stacked(self) -> torch.Tensor:
        """All the split's images as one tensor (read from the map when `rows` picks them from one)."""
        return self.images if self.rows is None else self.images[self.rows]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = seeded(key)
        return self.transform(self.load(index)), self.labels[index]


class FileImages(Dataset):
    """Image files decoded on access (folders may not fit in memory), converted to `mode` and made `size`
    (data.image_size: imagesize.size_hw). `key` is the setting that names the files (data.root, predict.input),
    for the message about a broken one."""

    def __init__(
        self,
        paths: list[str],
        labels: torch.Tensor,
        mode: str,
        size: int | list[int] | tuple[int, int],
        transform: v2.Transform | None,
        key: str = "data.root",
    ) -> None:
        self.paths, self.labels, self.mode, self.transform = paths, labels, mode, transform
        self.size = size_hw(size)
        self.key = key

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        return fit_size(decode(self.paths[index], self.mode, self.key), self.size)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = seeded(key)
        return self.transform(self.load(index)), self.labels[index]
