"""Datasets and loaders for every `data` option.

Each source becomes uint8 C x H x W images of one square size with integer labels, split into train/val/test
with `data.split_seed` (so splits stay fixed across trainer seed sweeps). Per sample, the train split runs the
`augmentation.train` transforms on the uint8 image, then every split scales to float and normalizes.
"""

import copy
import math
from dataclasses import dataclass, replace

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision import datasets
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shelltrain import distributed
from shelltrain.device_data import DeviceBatches, batched_augmentations
from shelltrain.errors import UserError
from shelltrain.schema import DATASET_FILES, check_data, data_root

# data.name -> torchvision class (schema.DATASET_FILES: its name in messages and what it expects under data.root)
_TORCHVISION = {
    "cifar10": datasets.CIFAR10,
    "cifar100": datasets.CIFAR100,
    "mnist": datasets.MNIST,
    "fashion_mnist": datasets.FashionMNIST,
}

# Images drawn (seeded) from the train split to estimate mean/std when the config leaves them null.
_STATS_SAMPLES = 1000


@dataclass
class DataBundle:
    """Loaders plus the facts the model (classes, channels, size) and reports (names, normalization) need."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    classes: list[str]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TensorImages(Dataset):
    """uint8 N x C x S x S images held in memory, already at their final size, so a sample costs only its transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform | None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class FileImages(Dataset):
    """Image files decoded on access (folders may not fit in memory), converted to `mode` and made S x S."""

    def __init__(
        self, paths: list[str], labels: torch.Tensor, mode: str, size: int, transform: v2.Transform | None
    ) -> None:
        self.paths, self.labels, self.mode, self.size, self.transform = paths, labels, mode, size, transform

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = F.pil_to_tensor(image.convert(self.mode))
        except OSError as e:  # verify() at build time cannot see every broken file (e.g. a truncated JPEG)
            raise UserError(f"data.root: '{path}' cannot be decoded ({_one_line(e)}); delete or replace it") from e
        return _square(pixels, self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.load(index)), self.labels[index]


class MixCollate:
    """Collate, then MixUp/CutMix the batch into soft labels; it runs in the loader's (seeded) worker."""

    def __init__(self, mix: v2.Transform) -> None:
        self.mix = mix

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(*default_collate(batch))


def build_data(
    data: DictConfig,
    augmentation: DictConfig,
    seed: int,
    pin_memory: bool = False,
    stats: tuple[list[float], list[float]] | None = None,
    device: torch.device | None = None,
) -> DataBundle:
    """Load `data.name`, split it, and wrap the splits in loaders.

    `stats` (mean, std), e.g. pretrained weights' normalization, is used where data.mean/data.std are null, instead
    of measuring them; 3-channel values for grey images are averaged.

    The train loader shuffles with its own generator seeded by `seed`; reseeding it each epoch makes the order and
    the worker seeds (hence augmentation and MixUp/CutMix) a function of (seed, epoch). Two exceptions: with
    num_workers=0 the transforms draw from torch's global RNG, and persistent workers keep their first seeds.

    Under DDP the train order comes from a DistributedSampler (seeded by `seed`, `set_epoch` every epoch) and the
    validation split is sharded without repeats; the test split stays whole (rank 0 tests). With
    `data.on_device=true` and a `device`, the splits become DeviceBatches on that device."""
    check_data(data)
    size = data.image_size
    if data.name == "imagefolder":
        sources, classes = _imagefolder(data)
        channels = data.channels or 3
    else:
        sources, classes = _in_memory(data)
        channels = data.channels or sources["train"][0].shape[1]
    sources, classes = _select_classes(sources, classes, data)
    labels = {split: y for split, (_, y) in sources.items()}
    splits = {}
    for split, (source, index) in _split_indices(labels, data).items():
        if split == "train" and data.get("samples_per_class") is not None:
            index = _budget(labels[source], index, data.samples_per_class, data.split_seed)
        items, y = sources[source][0], labels[source][index]
        if data.name == "imagefolder":
            paths = [items[i] for i in index.tolist()]
            splits[split] = FileImages(paths, y, "RGB" if channels == 3 else "L", size, None)
        else:
            splits[split] = TensorImages(_convert_channels(_square(items[index], size), channels).contiguous(), y, None)

    mean, std = _stats(data, channels, splits["train"], stats)  # measured on raw images, so transforms come after
    to_float = to_float_transforms(mean, std)
    augmentations = _augmentations(augmentation)
    splits["train"].transform = v2.Compose(augmentations + to_float)
    splits["val"].transform = splits["test"].transform = v2.Compose(to_float)
    _dry_run(splits["train"])

    mix = _mix(augmentation, len(classes))
    eval_batch_size = data.eval_batch_size or 2 * data.batch_size
    facts = dict(num_classes=len(classes), classes=classes, in_channels=channels, image_size=size, mean=mean, std=std)
    if data.get("on_device") and device is not None:
        if data.name == "imagefolder":
            raise UserError(
                "data.on_device=true holds in-memory datasets on the device; imagefolder reads image "
                "files as it goes: use data.on_device=false (and data.num_workers) for it"
            )
        names = [str(node.get("_target_")).rsplit(".", 1)[-1] for node in augmentation.train]
        batched = batched_augmentations(augmentations, size, names)
        on = {split: (splits[split].images.to(device), splits[split].labels.to(device)) for split in splits}
        return DataBundle(
            train=DeviceBatches(
                splits["train"],
                *on["train"],
                data.batch_size,
                mean,
                std,
                augment=batched,
                mix=mix,
                shuffle=True,
                drop_last=data.drop_last,
                seed=seed,
            ),
            val=DeviceBatches(splits["val"], *on["val"], eval_batch_size, mean, std),
            test=DeviceBatches(splits["test"], *on["test"], eval_batch_size, mean, std),
            **facts,
        )

    workers = data.num_workers
    persistent = data.persistent_workers and workers > 0  # DataLoader rejects persistent_workers without workers
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=persistent)
    sampler = val_sampler = None
    if distributed.world_size() > 1:
        sampler = DistributedSampler(
            splits["train"],
            distributed.world_size(),
            distributed.rank(),
            shuffle=True,
            seed=seed,
            drop_last=data.drop_last,
        )
        val_sampler = distributed.shard(len(splits["val"]))
    return DataBundle(
        train=DataLoader(
            splits["train"],
            batch_size=data.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(seed),
            drop_last=data.drop_last,
            collate_fn=MixCollate(mix) if mix is not None else None,
            **common,
        ),
        val=DataLoader(splits["val"], batch_size=eval_batch_size, sampler=val_sampler, **common),
        test=DataLoader(splits["test"], batch_size=eval_batch_size, **common),
        **facts,
    )


def to_float_transforms(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    """uint8 image -> normalized float: what every split ends with (and what prediction feeds a model)."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _in_memory(data: DictConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Native-size uint8 N x C x H x W images and labels per source split, and the class names."""
    if data.name == "digits":
        from sklearn.datasets import load_digits  # imported here: a failing start need not pay for sklearn

        digits = load_digits()  # 8x8 grey images with values 0..16
        images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
        return {"train": (images, torch.from_numpy(digits.target).long())}, [str(c) for c in digits.target_names]
    if data.name == "synthetic":
        generator = torch.Generator().manual_seed(data.split_seed)
        n, size = data.num_samples, data.image_size
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.randperm(n, generator=generator) % data.num_classes  # random order, balanced classes
        return {"train": (images, labels)}, [str(c) for c in range(data.num_classes)]
    return _torchvision(data)


def _torchvision(data: DictConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Load the official train and test splits through the torchvision class, keeping its arrays as uint8 tensors."""
    cls, (title, expected) = _TORCHVISION[data.name], DATASET_FILES[data.name]
    root = data_root(data)
    sources = {}
    for split in ("train", "test"):
        try:
            dataset = cls(str(root), train=split == "train", download=data.download)
        except Exception as e:  # missing/corrupt files and failed downloads raise many types; the user fixes all
            if data.download:
                raise UserError(
                    f"data.download: could not download {title} into '{root}' ({_one_line(e)}); "
                    f"check the network or place {expected} under data.root by hand"
                ) from e
            raise UserError(
                f"data.root: no readable {title} in '{root}' ({_one_line(e)}); "
                f"point data.root at the folder that holds {expected} or set data.download=true"
            ) from e
        images = torch.as_tensor(dataset.data)
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)  # NHWC (CIFAR) or NHW
        sources[split] = (images, torch.as_tensor(dataset.targets, dtype=torch.long))
    return sources, list(dataset.classes)


def _imagefolder(data: DictConfig) -> tuple[dict[str, tuple[list[str], torch.Tensor]], list[str]]:
    """File paths and labels for train/ and the optional val/ and test/ class-per-folder trees, all checked to open."""
    root = data_root(data)
    sources, classes = {}, None
    for split in ("train", "val", "test"):
        folder = root / split
        if not folder.is_dir():
            continue
        try:
            found = datasets.ImageFolder(str(folder))
        except FileNotFoundError as e:  # no class folders, or a class folder without image files
            message = f"data.root: no images in '{folder}' ({_one_line(e)}); put them in {folder}/<class>/"
            raise UserError(message) from e
        if classes is None:
            classes = found.classes
            if len(classes) < 2:
                raise UserError(
                    f"data.root: '{folder}' holds one class folder {classes}; a classifier needs at least two classes"
                )
        elif found.classes != classes:
            raise UserError(
                f"data.root: classes in {split}/ {found.classes} differ from train/ {classes}; "
                "give every split the same class folders"
            )
        sources[split] = ([path for path, _ in found.samples], torch.tensor(found.targets, dtype=torch.long))
    for paths, _ in sources.values():
        _verify_images(paths)
    return sources, classes


def _verify_images(paths: list[str]) -> None:
    """Open every file once so that a broken one is named now, not mid-epoch inside a worker."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... depending on the damage
            message = f"data.root: '{path}' is not a readable image ({_one_line(e)}); delete or replace it"
            raise UserError(message) from e


def _split_indices(labels: dict[str, torch.Tensor], data: DictConfig) -> dict[str, tuple[str, torch.Tensor]]:
    """Map train/val/test to (source split, indices into it): carve what the source lacks out of train (test
    first, then val from the rest), then cap each split at data.limit_samples."""
    seed = data.split_seed
    train = torch.arange(len(labels["train"]))
    splits = {}
    for split in ("test", "val"):
        if split in labels:
            splits[split] = (split, torch.arange(len(labels[split])))
        else:
            fraction = data[f"{split}_fraction"]
            # sklearn's rounding for a float test_size
            carved = math.ceil(fraction * len(train)) if isinstance(fraction, (int, float)) else 0
            if not 0 < carved < len(train):
                folder = f" or add a {split}/ folder" if data.name == "imagefolder" else ""
                raise UserError(
                    f"data.{split}_fraction: {fraction!r} of {len(train)} train images leaves an empty split; "
                    f"use a fraction that keeps images on both sides, e.g. 0.1{folder}"
                )
            train, index = _carve(labels["train"], train, carved, seed)
            splits[split] = ("train", index)
    splits["train"] = ("train", train)
    if data.limit_samples is not None:
        for split, (source, index) in splits.items():
            if len(index) > data.limit_samples:
                splits[split] = (source, _carve(labels[source], index, data.limit_samples, seed)[1])
    return {split: splits[split] for split in ("train", "val", "test")}


def _carve(labels: torch.Tensor, index: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of `index` into (rest, `count` carved), stratified when every class fits on both sides."""
    y = labels[index]
    _, per_class = torch.unique(y, return_counts=True)
    fits = int(per_class.min()) >= 2 and len(per_class) <= min(count, len(y) - count)
    stratify = y.numpy() if fits else None
    from sklearn.model_selection import train_test_split

    rest, carved = train_test_split(index.numpy(), test_size=count, random_state=seed, stratify=stratify)
    return torch.from_numpy(rest), torch.from_numpy(carved)


def _square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Scale the shorter side to `size` (antialiased) and center-crop: square images just scale, others keep aspect."""
    if images.shape[-2:] == (size, size):
        return images
    return F.center_crop(F.resize(images, [size], antialias=True), [size, size])


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[-3] == channels:
        return images
    return F.grayscale_to_rgb(images) if channels == 3 else F.rgb_to_grayscale(images)


def _stats(
    data: DictConfig, channels: int, train: Dataset, given: tuple[list[float], list[float]] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The configured mean/std (one value serves every channel), else `given` ones (fitted to the channels), else
    per-channel ones measured on the train split."""
    if (data.mean is None or data.std is None) and given is not None:
        return _fit_channels(given[0], channels), _fit_channels(given[1], channels)
    if data.mean is None or data.std is None:
        return _measure_stats(train, data.split_seed)
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


def _select_classes(
    sources: dict[str, tuple], classes: list[str], data: DictConfig
) -> tuple[dict[str, tuple], list[str]]:
    """Keep the images of data.classes (names, or indices into the dataset's classes), relabelled 0..k-1 in the
    order given."""
    wanted = data.get("classes")
    if wanted is None:
        return sources, classes
    picked = []
    for item in wanted:
        if str(item) in classes:
            picked.append(classes.index(str(item)))
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(classes):
            picked.append(item)
        else:
            shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
            raise UserError(
                f"data.classes: {item!r} is not a class of {data.name}; "
                f"use names ({shown}) or indices 0..{len(classes) - 1}"
            )
    if len(set(picked)) != len(picked) or len(picked) < 2:
        raise UserError(f"data.classes={list(wanted)} must name at least two different classes")
    relabel = torch.full((len(classes),), -1, dtype=torch.long)
    relabel[picked] = torch.arange(len(picked))
    selected = {}
    for split, (items, y) in sources.items():
        keep = (relabel[y] >= 0).nonzero().flatten()
        kept = items[keep] if isinstance(items, torch.Tensor) else [items[i] for i in keep.tolist()]
        selected[split] = (kept, relabel[y[keep]])
    return selected, [classes[i] for i in picked]


def _budget(labels: torch.Tensor, index: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """At most `per_class` train images of each class, drawn with `seed` (the same budget for every trainer seed)."""
    order = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))]
    counts: dict[int, int] = {}
    keep = []
    for i, label in zip(order.tolist(), labels[order].tolist()):
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(i)
    return torch.tensor(sorted(keep), dtype=torch.long)


def _measure_stats(train: Dataset, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _augmentations(augmentation: DictConfig) -> list[v2.Transform]:
    transforms = []
    for i, node in enumerate(augmentation.train):
        try:
            transforms.append(instantiate(node, _convert_="all"))
        except Exception as e:  # hydra wraps import and argument errors; the cause says what is wrong
            raise UserError(
                f"augmentation.train[{i}]: cannot build {node.get('_target_')!r} ({_one_line(e.__cause__ or e)}); "
                "fix its _target_ or arguments"
            ) from e
    return transforms


def _dry_run(train: Dataset) -> None:
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
                f"augmentation.train: fails on a {shape} uint8 image ({_one_line(e)}); fix or remove that transform"
            ) from e


def _mix(augmentation: DictConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix of a whole batch (one of them per batch when both are on)."""
    mixes = []
    if augmentation.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=float(augmentation.mixup_alpha), num_classes=num_classes))
    if augmentation.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=float(augmentation.cutmix_alpha), num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def cv_fold(bundle: DataBundle, folds: int, fold: int, seed: int) -> DataBundle:
    """Fold `fold` of a stratified `folds`-fold split of the train split (scikit-learn's StratifiedKFold, shuffled
    with `seed`): train on the other folds (augmented, as before) and validate on this one (un-augmented, like val).
    The test split is unchanged."""
    from sklearn.model_selection import StratifiedKFold

    train_set = bundle.train.dataset
    labels = train_set.labels.numpy()
    try:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train_index, val_index = list(splitter.split(labels.reshape(-1, 1), labels))[fold]
    except ValueError as e:  # more folds than images of some class / than images
        raise UserError(f"cv.folds={folds}: {_one_line(e)}; use fewer folds or more data") from e
    if isinstance(bundle.train, DeviceBatches):
        train, held = torch.from_numpy(train_index), torch.from_numpy(val_index)
        return replace(
            bundle,
            train=bundle.train.subset(train, augmented=True, shuffle=True, batch_size=bundle.train.batch_size),
            val=bundle.train.subset(held, augmented=False, shuffle=False, batch_size=bundle.val.batch_size),
        )
    held_out = copy.copy(train_set)
    held_out.transform = bundle.val.dataset.transform
    loader, val_loader = bundle.train, bundle.val
    common = dict(
        num_workers=loader.num_workers, pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers
    )
    return replace(
        bundle,
        train=DataLoader(
            Subset(train_set, train_index.tolist()),
            batch_size=loader.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(loader.generator.initial_seed()),
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
            **common,
        ),
        val=DataLoader(Subset(held_out, val_index.tolist()), batch_size=val_loader.batch_size, **common),
    )
