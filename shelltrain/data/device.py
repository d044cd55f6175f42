"""`data.on_device=true`: in-memory splits kept on the training device as uint8 tensors, augmented and
normalized a whole batch at a time there, with no DataLoader worker processes (airbench's recipe).

The batched augmentations draw the same distributions as the per-image torchvision transforms they stand for:
`RandomCrop` (padding in any mode; the crop keeps the image size), `RandomAffine` with translation only,
`RandomHorizontalFlip` and `RandomVerticalFlip`. A shift (crop or translation) is one gather per batch. Rotation,
scaling, RandomResizedCrop and ColorJitter have batched forms in batched.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from shelltrain import distributed
from shelltrain.data.batched import batched_form
from shelltrain.data.transforms import NormalizedFloat
from shelltrain.imagesize import size_hw
from shelltrain.rng import epoch_seed

ON_DEVICE = (
    "RandomCrop and RandomResizedCrop (output size = data.image_size), RandomAffine (no shear), RandomRotation "
    "(no expand), ColorJitter, RandomHorizontalFlip, RandomVerticalFlip"
)


class Shift:
    """Move every image by its own random (dy, dx), drawn uniformly from the given integer ranges; pixels from
    outside are filled as the padding mode says (constant `fill`, edge, reflect, symmetric), as
    torchvision pads them."""

    def __init__(
        self, rows: tuple[float, float], cols: tuple[float, float], mode: str, fill: int, rounded: bool = False
    ):
        self.rows, self.cols, self.mode, self.fill = rows, cols, mode, fill
        # RandomCrop's offsets are uniform integers; RandomAffine's are round(uniform(-m, m)) with m a fraction
        # of the size (`rounded`), which makes the end values half as likely.
        self.rounded = rounded

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        rows, row_ok = self._source(self._offsets(batch, self.rows, height, images.device), height)
        cols, col_ok = self._source(self._offsets(batch, self.cols, width, images.device), width)
        index = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, height * width)
        out = images.flatten(2).gather(2, index.expand(batch, channels, height * width)).view_as(images)
        if self.mode == "constant":
            inside = (row_ok[:, :, None] & col_ok[:, None, :])[:, None]
            out = out.masked_fill(~inside, self.fill)
        return out

    def _offsets(self, batch: int, bounds: tuple[float, float], size: int, device: torch.device) -> torch.Tensor:
        """Per image, the source coordinate of every output coordinate."""
        if self.rounded:
            reach = bounds[1] * size
            offsets = torch.empty(batch, 1, device=device).uniform_(-reach, reach).round().long()
        else:
            offsets = torch.randint(int(bounds[0]), int(bounds[1]) + 1, (batch, 1), device=device)
        return offsets + torch.arange(size, device=device)

    def _source(self, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source coordinates inside [0, size) for shifted ones, and which were inside to begin with."""
        inside = (index >= 0) & (index < size)
        if self.mode == "reflect":  # ... 2 1 | 0 1 2 ... n-1 | n-2 ...
            index = torch.where(index < 0, -index, torch.where(index >= size, 2 * (size - 1) - index, index))
        elif self.mode == "symmetric":  # ... 1 0 | 0 1 2 ... n-1 | n-1 ...
            index = torch.where(index < 0, -index - 1, torch.where(index >= size, 2 * size - 1 - index, index))
        return index.clamp(0, size - 1), inside


class Flip:
    """Flip each image with probability p along `dim` (-1: horizontally, -2: vertically)."""

    def __init__(self, p: float, dim: int):
        self.p, self.dim = p, dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < self.p
        return torch.where(flip, images.flip(self.dim), images)


def batched_augmentations(transforms: list[v2.Transform], size: Any, names: list[str]) -> tuple[list, str | None]:
    """The batched equivalents of `augmentation.train` for images of `size` (data.image_size), and the name of the
    first transform without one (then the caller falls back to the DataLoader path), else None."""
    size = size_hw(size)
    batched = []
    for transform, name in zip(transforms, names):
        op = _batched(transform, size) or batched_form(transform, size)
        if op is None:
            return [], name
        batched.append(op)
    return batched, None


def _batched(transform: v2.Transform, size: tuple[int, int]) -> Shift | Flip | None:
    if isinstance(transform, v2.RandomHorizontalFlip):
        return Flip(transform.p, -1)
    if isinstance(transform, v2.RandomVerticalFlip):
        return Flip(transform.p, -2)
    if isinstance(transform, v2.RandomCrop) and tuple(transform.size) == size:
        left, right, top, bottom = transform.padding or (0, 0, 0, 0)
        return Shift((-top, bottom), (-left, right), transform.padding_mode, _scalar_fill(transform.fill))
    if isinstance(transform, v2.RandomAffine):
        still = list(transform.degrees) == [0, 0] and transform.shear is None
        if still and transform.scale in (None, (1, 1), [1, 1]) and transform.translate is not None:
            dx, dy = (float(t) for t in transform.translate)
            return Shift((-dy, dy), (-dx, dx), "constant", _scalar_fill(transform.fill), rounded=True)
    return None


def _scalar_fill(fill: object) -> int:
    return int(fill) if isinstance(fill, (int, float)) else 0


class DeviceBatches:
    """Batches of one split held on the device: like a DataLoader over it (`len()` batches, `dataset`,
    `batch_size`, `drop_last`), minus the per-image work.

    `shuffle`: a new order every epoch (`set_epoch`, as with DistributedSampler), the same on every rank; each
    rank then takes its share, train splits padded to a multiple of the ranks as DistributedSampler does,
    evaluation splits without repeats. Augmentation draws from torch's RNG on the device, per rank.

    `pin`: batches built in host memory (data.cache=memory) for a CUDA device come out in pinned memory, so their
    copy to the GPU is asynchronous instead of blocking every step.
    """

    def __init__(
        self,
        dataset: Dataset,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: list | None = None,
        mix: v2.Transform | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        index: torch.Tensor | None = None,
        sharded: bool = True,
        pin: bool = False,
    ):
        self.source = dataset  # the whole split; `index` picks from it
        self.dataset = dataset if index is None else Subset(dataset, index.tolist())
        self.images, self.labels = images, labels
        self.index = index.to(images.device) if index is not None else None
        self.batch_size, self.drop_last, self.shuffle, self.seed = batch_size, drop_last, shuffle, seed
        self.normalize = NormalizedFloat(mean, std)
        self.augment, self.mix = augment or [], mix
        self.sharded = sharded  # False: every rank sees the whole split (the test split: rank 0 tests it all)
        self.pin = pin
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def unsharded(self) -> DeviceBatches:
        """The same batches over the whole split, as one process iterates them (rank 0 working alone)."""
        whole = copy.copy(self)
        whole.sharded = False
        return whole

    def subset(self, index: torch.Tensor, augmented: bool, shuffle: bool, batch_size: int) -> DeviceBatches:
        """The same device tensors, restricted to `index` (positions in this split): cross-validation folds."""
        if self.index is not None:
            index = self.index.cpu()[index]
        return DeviceBatches(
            self.source,
            self.images,
            self.labels,
            batch_size,
            self.normalize.mean,
            self.normalize.std,
            augment=self.augment if augmented else None,
            mix=self.mix if augmented else None,
            shuffle=shuffle,
            drop_last=self.drop_last if shuffle else False,
            seed=self.seed,
            index=index,
            sharded=self.sharded,
            pin=self.pin,
        )

    def _order(self) -> torch.Tensor:
        count = len(self.images) if self.index is None else len(self.index)
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(count, generator=generator).to(self.images.device)
        else:
            order = torch.arange(count, device=self.images.device)
        ranks = distributed.world_size() if self.sharded else 1
        if ranks > 1:
            if self.shuffle:  # training: every rank the same number of batches, as DistributedSampler
                padded = -(-count // ranks) * ranks
                order = torch.cat([order, order[: padded - count]]) if padded > count else order
            order = order[distributed.rank() :: ranks]
        return order if self.index is None else self.index[order]

    def _count(self) -> int:
        count = len(self.images) if self.index is None else len(self.index)
        ranks = distributed.world_size() if self.sharded else 1
        if ranks == 1:
            return count
        if self.shuffle:
            return -(-count // ranks)
        return len(range(distributed.rank(), count, ranks))

    def __len__(self) -> int:
        count = self._count()
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            picked = order[start : start + self.batch_size]
            images = self.images[picked]
            for op in self.augment:
                images = op(images)
            images = self.normalize(images)
            labels = self.labels[picked]
            if self.mix is not None:
                images, labels = self.mix(images, labels)
            yield (images.pin_memory(), labels.pin_memory()) if self.pin else (images, labels)
