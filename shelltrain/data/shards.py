"""`data=shards`: WebDataset tar shards (the `webdataset` library reads the tar files), local paths or any fsspec
URL (`s3://...`), brace-expanded (`train-{000000..000099}.tar`).

The train split streams: every epoch the shard list is shuffled (seeded by the trainer seed and the epoch) and
dealt out whole, shard by shard, to the (rank, loader worker) slots, each slot shuffling its samples in a buffer
of `data.shards.buffer`. Each sample is therefore read once per epoch by exactly one worker of one rank. DDP needs
every rank to take the same number of steps: an epoch is as many batches as the rank with the fewest has, so the
epoch is exact (every sample once) when the ranks' shards hold equally many samples (equal shards whose count is a
multiple of the ranks, as `shelltrain-shards` writes them); otherwise the samples past that count on the other
ranks are left out for that epoch (different ones each epoch), and the log says how many at most.

The val and test shards are decoded once into memory at the start (evaluation splits: keep them to what fits).
Per-shard sample counts come from `shards.json` beside the shards (written by `shelltrain-shards`), else from one
counting pass over the train shards at the start."""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2

from shelltrain import distributed, remote
from shelltrain.console import make_console, say
from shelltrain.data.datasets import TensorImages
from shelltrain.data.loader import Loader, MixCollate, loader_settings, worker_count
from shelltrain.data.sources import GREY_MODES, decode_bytes
from shelltrain.data.transforms import (
    augmentations,
    dry_run,
    fit_size,
    mix_transform,
    normalization_stats,
    to_float_transforms,
)
from shelltrain.dataroot import user_path
from shelltrain.errors import UserError
from shelltrain.imagesize import size_hw
from shelltrain.remote import one_line

INDEX = "shards.json"  # beside the shards: {"classes": [...], "counts": {shard file name: samples}}
HEAD = 256  # train samples decoded at the start: channels, normalization statistics, the transforms' dry run


def _webdataset() -> Any:
    """webdataset's tar readers (an optional extra: imported when shards are read)."""
    try:
        from webdataset import filters, shardlists, tariterators
    except ImportError as e:
        raise UserError('data=shards reads WebDataset shards; pip install "shelltrain[shards]"') from e
    return filters, shardlists, tariterators


def shard_urls(spec: str | None, key: str) -> list[str]:
    """A shard spec brace-expanded into URLs (a local path absolute, from where the run was launched), each one
    checked to exist."""
    if spec is None:
        raise UserError(f"{key}: not set; give the shards, e.g. {key}=data/train-{{000000..000009}}.tar")
    _, shardlists, _ = _webdataset()
    urls = [u if remote.is_url(u) else str(user_path(u)) for u in shardlists.expand_urls(str(spec))]
    for url in urls:
        if not (remote.exists(url, key) if remote.is_url(url) else os.path.isfile(url)):
            raise UserError(f"{key}: shard '{url}' does not exist; check the pattern {spec!r}")
    return urls


def _open(url: str, key: str) -> IO[bytes]:
    return remote.open_url(url, key) if remote.is_url(url) else open(url, "rb")


def samples(urls: list[str], key: str) -> Iterator[dict]:
    """The samples (dicts of a key's files, by extension) of `urls` in order, through webdataset's tar reader."""
    _, _, tariterators = _webdataset()
    for url in urls:
        with _open(url, key) as stream:
            try:
                yield from tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": stream}]))
            except UserError:
                raise
            except Exception as e:  # a truncated or foreign file: tarfile and webdataset raise several types
                raise UserError(f"{key}: '{url}' is not a readable tar shard ({one_line(e)}); rewrite it") from e


def read_index(urls: list[str], key: str) -> dict | None:
    """`shards.json` from the first shard's folder when it lists every shard of `urls`, else None."""
    folder = urls[0].rsplit("/", 1)[0]
    path = f"{folder}/{INDEX}"
    if not (remote.exists(path, key) if remote.is_url(path) else os.path.isfile(path)):
        return None
    with _open(path, key) as handle:
        index = json.load(handle)
    counts = index.get("counts", {})  # the index file's own keys (written by shard_writer), not a config node
    return index if all(url.rsplit("/", 1)[-1] in counts for url in urls) else None


class Decoder:
    """A raw sample -> (uint8 image at the configured size, class index); picklable for loader workers."""

    def __init__(self, shards: DictConfig, classes: list[str], mode: str, size: Any) -> None:
        self.image_keys, self.label_key = shards.image_keys.split(";"), shards.label_key
        self.index = {name: i for i, name in enumerate(classes)}
        self.mode, self.size = mode, size

    def image(self, sample: dict) -> torch.Tensor:
        """The sample's image at its native size."""
        for name in self.image_keys:
            if name in sample:
                where = f"{sample['__url__']}:{sample['__key__']}.{name}"
                return decode_bytes(sample[name], where, self.mode, "data.shards")
        raise UserError(
            f"data.shards.image_keys: sample '{sample['__key__']}' in {sample['__url__']} has no "
            f"{'/'.join(self.image_keys)} file (it has {', '.join(k for k in sample if not k.startswith('__'))}); "
            "name its image extension in data.shards.image_keys"
        )

    def label(self, sample: dict) -> int:
        text = label_text(sample, self.label_key)
        if text in self.index:
            return self.index[text]
        if text.isdigit() and int(text) < len(self.index):
            return int(text)
        raise UserError(
            f"data.shards.label_key: sample '{sample['__key__']}' in {sample['__url__']} has label '{text}', "
            f"not one of the {len(self.index)} classes; fix data.classes or the shard"
        )

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        return fit_size(self.image(sample), self.size), self.label(sample)


def label_text(sample: dict, label_key: str) -> str:
    """The text of a sample's label file (a class index or a class name)."""
    if label_key not in sample:
        raise UserError(
            f"data.shards.label_key: sample '{sample['__key__']}' in {sample['__url__']} has no '{label_key}' file; "
            "set data.shards.label_key to the extension that holds the label (e.g. cls)"
        )
    return sample[label_key].decode("utf-8").strip()


def classes_of(data: DictConfig, labels: set[str]) -> list[str]:
    """data.classes in its order; else the labels found: 0..max when they are all indices, else sorted names."""
    if data.classes is not None:
        return [str(c) for c in data.classes]
    if labels and all(text.isdigit() for text in labels):
        return [str(i) for i in range(max(map(int, labels)) + 1)]
    return sorted(labels)


def count(urls: list[str], label_key: str, key: str) -> tuple[list[int], set[str]]:
    """Each shard's sample count and the labels found, by reading the shards once."""
    counts, labels = [], set()
    for url in urls:
        n = 0
        for sample in samples([url], key):
            labels.add(label_text(sample, label_key))
            n += 1
        counts.append(n)
    return counts, labels


class ShardStream(IterableDataset):
    """The train shards as a stream: shards dealt to (rank, worker) slots per epoch, samples shuffled in a buffer
    (module docstring). `transform` is set by build_data, as on the map-style splits."""

    def __init__(
        self, urls: list[str], counts: list[int], decoder: Decoder, settings: DictConfig, seed: int, workers: int
    ) -> None:
        self.urls, self.counts, self.decoder, self.seed = urls, counts, decoder, seed
        self.batch_size, self.drop_last, self.buffer = settings.batch_size, settings.drop_last, settings.shards.buffer
        self.workers = max(1, workers)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.epoch, self.transform = 0, None

    def __len__(self) -> int:
        return sum(self.counts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def slots(self, epoch: int) -> list[list[int]]:
        """The shard indices of each slot (worker w of rank r is slot w * ranks + r) in `epoch`: a seeded shuffle,
        dealt round-robin so that the ranks' shares differ by at most one shard."""
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        slots: list[list[int]] = [[] for _ in range(self.workers * self.world)]
        for i, shard in enumerate(order):
            slots[i % len(slots)].append(shard)
        return slots

    def rank_batches(self, epoch: int) -> list[int]:
        """How many batches each rank's workers make of their shards in `epoch` (each worker batches its own)."""
        batches = [0] * self.world
        for slot, shards in enumerate(self.slots(epoch)):
            held = sum(self.counts[i] for i in shards)
            batches[slot % self.world] += held // self.batch_size if self.drop_last else -(-held // self.batch_size)
        return batches

    def steps(self) -> int:
        """The batches every rank trains this epoch: the fewest any rank has."""
        return min(self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        mine = [self.urls[i] for i in self.slots(self.epoch)[worker * self.world + self.rank]]
        filters, _, _ = _webdataset()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        for sample in filters.shuffle(self.buffer, self.buffer, rng=rng)(samples(mine, "data.shards.train")):
            image, label = self.decoder(sample)
            yield self.transform(image), label


class StreamLoader(Loader):
    """The train loader of a ShardStream: an epoch is `steps()` batches on every rank, so DDP ranks stay in step."""

    def __len__(self) -> int:
        return self.dataset.steps()

    def set_epoch(self, epoch: int) -> None:
        """The engine calls this before each epoch; workers start anew each epoch and take the dataset's epoch."""
        self.dataset.set_epoch(epoch)

    def unsharded(self) -> StreamLoader:
        """The whole stream, dealt as one process deals it (every shard, its workers' slots), for rank 0's work
        alone after DDP training (SWA's BatchNorm pass)."""
        whole = copy.copy(self.dataset)
        whole.rank, whole.world = 0, 1
        settings = loader_settings(self.num_workers, False, self.pin_memory)
        generator = torch.Generator().manual_seed(self.generator.initial_seed())
        return StreamLoader(
            whole,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            collate_fn=self.collate_fn,
            generator=generator,
            **settings,
        )

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        try:
            yield from itertools.islice(batches, len(self))
        finally:
            batches.close()


@dataclass
class Shards:
    """What data=shards gives build_data: the train stream, the decoded val and test splits, the first train
    samples (un-augmented: statistics and the dry run), classes, channels and a line for the log."""

    train: ShardStream
    val: TensorImages
    test: TensorImages
    head: TensorImages
    classes: list[str]
    channels: int
    native_channels: int
    sides: list[int]
    note: str


def open_shards(data: DictConfig, seed: int, workers: int) -> Shards:
    """Find, count and open the shards of data=shards (module docstring)."""
    started = time.perf_counter()
    urls = shard_urls(data.shards.train, "data.shards.train")
    index = read_index(urls, "data.shards.train")
    if index is not None:
        counts, labels = [index["counts"][u.rsplit("/", 1)[-1]] for u in urls], set(index.get("classes") or [])
        how = INDEX
    else:
        counts, labels = count(urls, data.shards.label_key, "data.shards.train")
        how = f"counted in {time.perf_counter() - started:.1f} s; shelltrain-shards writes {INDEX} to skip this"
    classes = index["classes"] if index is not None and data.classes is None else classes_of(data, labels)
    if len(classes) < 2:
        raise UserError(f"data.shards.train: the shards hold the classes {classes}; a classifier needs two")
    raw = list(itertools.islice(samples(urls, "data.shards.train"), HEAD))
    probe = Decoder(data.shards, classes, "RGB", data.image_size)
    grey = all(_grey(sample, probe) for sample in raw)
    native_channels = 1 if grey else 3
    channels = data.channels or native_channels
    decoder = Decoder(data.shards, classes, "RGB" if channels == 3 else "L", data.image_size)
    natives = [decoder.image(sample) for sample in raw]
    head = TensorImages(torch.stack([fit_size(i, data.image_size) for i in natives]), _labels(raw, decoder), None)
    train = ShardStream(urls, counts, decoder, data, seed, workers)
    val = read_split(data.shards.val, "data.shards.val", decoder)
    test = read_split(data.shards.test, "data.shards.test", decoder)
    sides = [min(i.shape[-2:]) for i in natives]
    return Shards(train, val, test, head, classes, channels, native_channels, sides, _note(train, how))


def _grey(sample: dict, decoder: Decoder) -> bool:
    for name in decoder.image_keys:
        if name in sample:
            with Image.open(io.BytesIO(sample[name])) as image:  # the header: its mode
                return image.mode in GREY_MODES
    return False


def _labels(raw: list[dict], decoder: Decoder) -> torch.Tensor:
    return torch.tensor([decoder.label(sample) for sample in raw], dtype=torch.long)


def read_split(spec: str | None, key: str, decoder: Decoder) -> TensorImages:
    """An evaluation split's shards decoded into memory, in order."""
    urls = shard_urls(spec, key)
    images, labels = [], []
    for sample in samples(urls, key):
        image, label = decoder(sample)
        images.append(image)
        labels.append(label)
    if not images:
        raise UserError(f"{key}: the shards {spec!r} hold no samples; write some, or point {key} at other shards")
    return TensorImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), None)


def _note(train: ShardStream, how: str) -> str:
    """How the train shards are read: counts, slots, and whether the epoch is exact (module docstring)."""
    total, batches = len(train), train.rank_batches(0)
    steps = min(batches)
    where = f"{len(train.urls)} shards ({how}); {train.world} rank(s) x {train.workers} worker(s)"
    if len(set(batches)) == 1:
        return f"data.shards: {total} train samples in {where}: every sample once an epoch"
    per_rank = [0] * train.world
    for slot, shards in enumerate(train.slots(0)):
        per_rank[slot % train.world] += sum(train.counts[i] for i in shards)
    left = sum(max(0, n - steps * train.batch_size) for n, b in zip(per_rank, batches) if b > steps)
    return (
        f"data.shards: {total} train samples in {where}: the ranks' shares differ, so each trains {steps} batches "
        f"an epoch and up to {left} samples are left out of each epoch (different ones each epoch); "
        "equal shards, as many as a multiple of the ranks, make every epoch exact"
    )


def streamed_data(
    data: DictConfig,
    augmentation: DictConfig,
    seed: int,
    pin_memory: bool,
    stats: tuple[list[float], list[float]] | None,
) -> dict[str, Any]:
    """data=shards as build_data's DataBundle fields: the train StreamLoader, the val (sharded under DDP) and test
    loaders over the decoded splits, and the facts. Normalization is measured on the first train samples."""
    workers = worker_count(data.num_workers)
    shards = open_shards(data, seed, workers)
    say(make_console(quiet=not distributed.is_main()), shards.note)
    mean, std = normalization_stats(data, shards.channels, shards.head, stats)
    to_float = to_float_transforms(mean, std)
    shards.head.transform = shards.train.transform = v2.Compose(augmentations(augmentation) + to_float)
    shards.val.transform = shards.test.transform = v2.Compose(to_float)
    dry_run(shards.head)
    mix = mix_transform(augmentation, len(shards.classes))
    common = loader_settings(workers, data.persistent_workers, pin_memory)
    eval_batch_size = data.eval_batch_size or 2 * data.batch_size
    val_sampler = distributed.shard(len(shards.val)) if distributed.world_size() > 1 else None
    train = StreamLoader(
        shards.train,
        batch_size=data.batch_size,
        drop_last=data.drop_last,
        collate_fn=MixCollate(mix) if mix is not None else None,
        generator=torch.Generator().manual_seed(seed),
        **{**common, "persistent_workers": False},  # each epoch's workers take that epoch's shards
    )
    channels_from = (
        "data.channels"
        if data.channels
        else f"data.channels=null: {'grey' if shards.native_channels == 1 else 'colour'} images"
    )
    return dict(
        train=train,
        val=Loader(shards.val, batch_size=eval_batch_size, sampler=val_sampler, **common),
        test=Loader(shards.test, batch_size=eval_batch_size, **common),
        num_classes=len(shards.classes),
        classes=shards.classes,
        in_channels=shards.channels,
        image_size=size_hw(data.image_size),
        mean=mean,
        std=std,
        native_sides=(min(shards.sides), max(shards.sides)),
        channels_from=channels_from,
    )
