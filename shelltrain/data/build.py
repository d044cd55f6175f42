"""The data pipeline of a run: `build_data` loads `data.name` (or `data.source`), splits it, measures or takes the
normalization, attaches the transforms, and hands the splits to the model as a DataBundle of loaders, or of
batches gathered and augmented on the device (data.on_device) or in RAM (data.cache=memory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from shelltrain import distributed
from shelltrain.console import make_console, say
from shelltrain.data.balance import BalancedSampler, long_tail, train_labels
from shelltrain.data.cache import cached_images
from shelltrain.data.datasets import FileImages, TensorImages
from shelltrain.data.device import ON_DEVICE, DeviceBatches, batched_augmentations
from shelltrain.data.hf import HFImages, HFTable, hf_sources, sample_pictures
from shelltrain.data.loader import Loader, MixCollate, loader_settings, train_loader, worker_count
from shelltrain.data.manifest import manifest_path, manifest_sources
from shelltrain.data.shards import StreamLoader, streamed_data
from shelltrain.data.sources import imagefolder, in_memory, sample_files
from shelltrain.data.splits import budget, select_classes, split_indices
from shelltrain.data.transforms import (
    augmentations,
    convert_channels,
    dry_run,
    fit_size,
    mix_transform,
    normalization_stats,
    to_float_transforms,
)
from shelltrain.dataroot import data_root
from shelltrain.errors import UserError
from shelltrain.imagesize import size_hw
from shelltrain.multilabel import stratum
from shelltrain.schema_data import check_data


@dataclass
class DataBundle:
    """Loaders plus the facts the model (classes, channels, size) and reports (names, normalization) need."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    classes: list[str]
    in_channels: int
    image_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_sides: tuple[int, int] | None = None  # the shorter side of the source images, smallest and largest
    channels_from: str = "data.channels"  # how the channel count was chosen, for the log
    train_groups: torch.Tensor | None = None  # a group code per train image (a manifest's group column), for CV folds


def build_data(
    data: DictConfig,
    augmentation: DictConfig,
    seed: int,
    pin_memory: bool = False,
    stats: tuple[list[float], list[float]] | None = None,
    device: torch.device | None = None,
    multi_label: bool = False,
) -> DataBundle:
    """Load `data.name` (or `data.source`), split it, and wrap the splits in loaders.

    `stats` (mean, std), e.g. pretrained weights' normalization, is used where data.mean/data.std are null, instead
    of measuring them; 3-channel values for grey images are averaged.

    The train loader shuffles with its own generator seeded by `seed`; reseeding it each epoch makes the order and
    the per-sample seeds (hence augmentation and MixUp/CutMix) a function of (seed, epoch), persistent workers or
    not. With num_workers=0 the transforms draw from torch's global RNG (which the engine seeds per epoch).

    Under DDP the train order comes from a DistributedSampler (seeded by `seed`, `set_epoch` every epoch) and the
    validation split is sharded without repeats; the test split stays whole (rank 0 tests). With
    `data.on_device=true` and a `device`, the splits become DeviceBatches on that device. `multi_label`
    (trainer.loss=bce): a manifest's label cells hold `|`-joined labels, read as multi-hot rows."""
    check_data(data)
    if data.name == "shards" and data.source is None:  # the train split streams from tar shards
        if multi_label:
            raise UserError("data=shards holds one class per sample; trainer.loss=bce needs data=manifest")
        return DataBundle(**streamed_data(data, augmentation, seed, pin_memory, stats))
    splits, classes, channels, native = _datasets(data, multi_label)
    # measured on raw images, so the transforms come after
    mean, std = normalization_stats(data, channels, splits["train"], stats)
    to_float = to_float_transforms(mean, std)
    train_transforms = augmentations(augmentation)
    splits["train"].transform = v2.Compose(train_transforms + to_float)
    splits["val"].transform = splits["test"].transform = v2.Compose(to_float)
    dry_run(splits["train"])

    mix = mix_transform(augmentation, len(classes))
    size = size_hw(data.image_size)
    facts = dict(num_classes=len(classes), classes=classes, in_channels=channels, image_size=size, mean=mean, std=std)
    facts.update(native)
    if data.on_device and device is not None and isinstance(splits["train"], FileImages):
        raise UserError(
            f"data.on_device=true holds in-memory datasets on the device; {data.name} reads image "
            "files as it goes: set data.cache=memory or disk (decoded once), or data.on_device=false"
        )
    where, key = _batch_device(data, splits, device)
    if where is not None:
        names = [str(node.get("_target_")).rsplit(".", 1)[-1] for node in augmentation.train]
        batched, missing = batched_augmentations(train_transforms, data.image_size, names)
        if missing is None:
            pin = pin_memory and where.type == "cpu"  # batches built in RAM for a CUDA device
            return DataBundle(**_device_batches(data, splits, where, mean, std, batched, mix, seed, pin), **facts)
        say(make_console(), f"{key}: {missing} has no batched form ({ON_DEVICE} have); using loaders")
    return DataBundle(**_loaders(data, splits, pin_memory, mix, seed), **facts)


def _batch_device(
    data: DictConfig, splits: dict[str, Dataset], device: torch.device | None
) -> tuple[torch.device | None, str]:
    """Where whole batches are gathered from the splits' uint8 arrays and augmented, and the setting that asks for
    it: the training device (data.on_device=true), or the CPU when data.cache=memory holds the images in RAM (a
    batch is then one gather and one normalize in the main process, not 64 samples transformed, collated and
    passed between processes). None: per sample, in DataLoader workers (image files, a memory-mapped cache, or
    data.balance=sampler, whose draws need a sampler)."""
    if data.on_device and device is not None:
        return device, "data.on_device"
    train = splits["train"]
    in_ram = isinstance(train, TensorImages) and train.rows is None
    if data.cache == "memory" and in_ram and data.balance != "sampler":
        return torch.device("cpu"), "data.cache=memory"
    return None, ""


def _datasets(data: DictConfig, multi_label: bool = False) -> tuple[dict[str, Dataset], list[str], int, dict]:
    """The train/val/test datasets (transforms still unset), the class names, the channel count, and DataBundle's
    facts for the log (the source images' native sides, how the channels were chosen) and for CV (train_groups)."""
    size = data.image_size
    sources, classes, native_channels, kind, sides, groups = _sources(data, multi_label)
    channels = data.channels or native_channels
    facts = {
        "native_sides": (min(sides), max(sides)),
        "channels_from": "data.channels" if data.channels else f"data.channels=null: {kind}",
    }
    if sources["train"][1].ndim == 1:  # multi-hot rows (a manifest's) already hold data.classes only
        sources, classes = select_classes(sources, classes, data)
    targets = {split: y for split, (_, y) in sources.items()}
    labels = {split: stratum(y) for split, y in targets.items()}  # multi-hot rows: stratified by the rarest label
    splits: dict[str, Dataset] = {}
    for split, (source, index) in split_indices(labels, data, groups.get("train")).items():
        if split == "train" and data.samples_per_class is not None:
            index = budget(labels[source], index, data.samples_per_class, data.split_seed)
        if split == "train" and data.imbalance is not None:  # a long-tailed train split
            index = long_tail(labels[source], index, float(data.imbalance), data.split_seed)
        if split == "train" and groups:
            facts["train_groups"] = groups["train"][index]
        items, y = sources[source][0], targets[source][index]
        if isinstance(items, list):  # image files
            paths = [items[i] for i in index.tolist()]
            key = "data.manifest" if data.name == "manifest" else "data.root"
            splits[split] = FileImages(paths, y, "RGB" if channels == 3 else "L", size, None, key)
        elif isinstance(items, HFTable):  # data=hf: rows of the Arrow table, decoded as drawn
            splits[split] = HFImages(items, index, y, "RGB" if channels == 3 else "L", size)
        elif getattr(items, "is_mapped", False):  # data.cache=disk: rows of the map, read as drawn
            splits[split] = TensorImages(items, y, None, rows=index)
        else:
            splits[split] = TensorImages(convert_channels(fit_size(items[index], size), channels).contiguous(), y, None)
    return splits, classes, channels, facts


def _sources(
    data: DictConfig, multi_label: bool = False
) -> tuple[dict, list[str], int, str, list[int], dict[str, torch.Tensor]]:
    """The source splits (image files, decoded when data.cache is set, or in-memory images), the class names, the
    native channel count and its kind of image, the sampled native sides, and each split's group codes ({}: none)."""
    groups: dict[str, torch.Tensor] = {}
    if data.source is None and data.name in ("imagefolder", "manifest"):
        if data.name == "imagefolder":
            sources, classes = imagefolder(data)
        else:
            sources, classes, groups = manifest_sources(data, multi_label=multi_label)
        grey, sides = sample_files(sources["train"][0])
        native_channels, kind = (1, "grey images") if grey else (3, "colour images")
        if data.cache != "none":
            sources = decoded_sources(data, sources, data.channels or native_channels)
        return sources, classes, native_channels, kind, sides, groups
    if data.source is None and data.name == "hf":
        sources, classes = hf_sources(data)
        grey, sides = sample_pictures(sources["train"][0])
        return sources, classes, 1 if grey else 3, "grey images" if grey else "colour images", sides, groups
    sources, classes = in_memory(data)
    images = sources["train"][0]
    native_channels = images.shape[1]
    kind = "grey images" if native_channels == 1 else f"{native_channels}-channel images"
    return sources, classes, native_channels, kind, [min(images.shape[-2:])], groups


def decoded_sources(data: DictConfig, sources: dict, channels: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`data.cache`: each image folder's files as one decoded uint8 array (cache.py), at the final size and
    channels; `disk` arrays stay memory-mapped (`is_mapped`)."""
    decoded = {}
    # the cache's name: the folder, or the manifest file and split (its key lists the files); resolved once, as a
    # URL's is a listing of its objects
    base = manifest_path(data) if data.name == "manifest" else data_root(data)
    for split, (paths, labels) in sources.items():
        folder = f"{base}:{split}" if data.name == "manifest" else str(base / split)
        images = cached_images(
            folder,
            paths,
            "RGB" if channels == 3 else "L",
            data.image_size,
            data.cache,
            data.cache_dir,
            data.cache_max_memory,
            worker_count("auto"),
            data.cache_check,
        )
        decoded[split] = (images, labels)
    return decoded


def _device_batches(
    data: DictConfig,
    splits: dict[str, Dataset],
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: list,
    mix: v2.Transform | None,
    seed: int,
    pin: bool,
) -> dict[str, DeviceBatches]:
    """The splits held on `device`, batched there (train shuffled, augmented and mixed in batches); `pin`: each
    batch in pinned host memory (data.cache=memory training on CUDA)."""
    eval_batch_size = data.eval_batch_size or 2 * data.batch_size
    on = {split: (splits[split].stacked().to(device), splits[split].labels.to(device)) for split in splits}
    train = DeviceBatches(
        splits["train"],
        *on["train"],
        data.batch_size,
        mean,
        std,
        augment=augment,
        mix=mix,
        shuffle=True,
        drop_last=data.drop_last,
        seed=seed,
        pin=pin,
    )
    return {
        "train": train,
        "val": DeviceBatches(splits["val"], *on["val"], eval_batch_size, mean, std, pin=pin),
        "test": DeviceBatches(splits["test"], *on["test"], eval_batch_size, mean, std, sharded=False, pin=pin),
    }


def _loaders(
    data: DictConfig, splits: dict[str, Dataset], pin_memory: bool, mix: v2.Transform | None, seed: int
) -> dict[str, DataLoader]:
    """DataLoaders of the splits (a DistributedSampler for train and a shard of val under DDP). Workers (their
    number `data.num_workers`, "auto": the cores) persist across epochs and evaluations unless
    data.persistent_workers=false; batches are pinned for the copy to a CUDA device (`pin_memory`)."""
    eval_batch_size = data.eval_batch_size or 2 * data.batch_size
    workers = worker_count(data.num_workers)
    common = loader_settings(workers, data.persistent_workers, pin_memory)
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
    if data.balance == "sampler":  # inverse-frequency draws, each rank its share
        sampler = BalancedSampler(splits["train"].labels, seed, distributed.rank(), distributed.world_size())
    generator = torch.Generator().manual_seed(seed)
    collate = MixCollate(mix) if mix is not None else None
    train = train_loader(splits["train"], data.batch_size, generator, sampler, data.drop_last, collate, common)
    return {
        "train": train,
        "val": Loader(splits["val"], batch_size=eval_batch_size, sampler=val_sampler, **common),
        "test": Loader(splits["test"], batch_size=eval_batch_size, **common),
    }


def unsharded(loader: DataLoader | DeviceBatches) -> DataLoader | DeviceBatches:
    """The whole split behind one rank's `loader`, served as one process would serve it (the same order, batches
    and augmentation): what rank 0 works on alone after DDP training, so SWA's BatchNorm statistics and the
    calibration temperature come from the whole split, as in one process, not from rank 0's share. `loader`
    itself in one process."""
    if distributed.world_size() == 1:
        return loader
    if isinstance(loader, (DeviceBatches, StreamLoader)):
        return loader.unsharded()
    sampler = getattr(loader.sampler, "inner", None) or loader.sampler  # inside a worker-seeding SeededSampler
    common = loader_settings(loader.num_workers, loader.persistent_workers, loader.pin_memory)
    if isinstance(sampler, BalancedSampler):
        whole = BalancedSampler(train_labels(loader), sampler.seed)
    elif isinstance(sampler, DistributedSampler):
        whole = None  # shuffled by the loader's generator, as in one process
    else:  # an evaluation split's shard: in order
        return Loader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, **common)
    generator = torch.Generator().manual_seed(loader.generator.initial_seed() if loader.generator else 0)
    batch_size, collate = loader.batch_size, loader.collate_fn
    return train_loader(loader.dataset, batch_size, generator, whole, loader.drop_last, collate, common)
