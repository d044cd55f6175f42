"""The schema of the `data` group (`DataConfig`, and `check_data`, its checks with data.root's), of the data options
that bring a section of their own (data=shards: `data.shards`, data=hf: `data.hf`; `DATA_OPTIONS`), and of the
`output` block (output.mirror). Types and checks only: the values and each key's meaning live in configs/data/*.yaml
and configs/train.yaml; schema.py registers them with the other groups. Torch-free."""

# ruff: noqa: UP045 (OmegaConf reads Optional[...], not X | None, in structured configs)
from __future__ import annotations

from dataclasses import dataclass, make_dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from shelltrain import schema_values as values
from shelltrain.checks import at_least, check_fractions, check_workers, finite_list, one_of, to_schema
from shelltrain.dataroot import DATASET_FILES, check_data_root
from shelltrain.errors import UserError
from shelltrain.imagesize import check_size
from shelltrain.remote import is_url

# data.* settings a streamed source cannot honour -> the fix, checked by ShardsSection.check
_NOT_STREAMED = {
    "cache": ("none", "shards are read as they stream; set data.cache=none"),
    "on_device": (False, "shards stream through loader workers; set data.on_device=false"),
    "balance": ("none", "a stream has no class counts to weigh by; set data.balance=none"),
    "imbalance": (None, "a stream is not subsampled; set data.imbalance=null"),
    "samples_per_class": (None, "a stream is not subsampled; set data.samples_per_class=null"),
    "limit_samples": (None, "a stream is not subsampled; write fewer shards, or set data.limit_samples=null"),
}


@dataclass
class DataConfig:
    """The `data` group. `source` (a `_target_` that builds the user's dataset) frees `name` from the packaged
    datasets and skips their root/files checks. `mean`/`std` are facts of a dataset: null measures them."""

    name: str
    source: Optional[Any]
    root: Optional[str]
    download: bool
    image_size: Optional[Any]  # one int (a square) or [height, width]: imagesize.size_hw
    channels: Optional[int]
    mean: Optional[list[float]]
    std: Optional[list[float]]
    batch_size: int
    eval_batch_size: Optional[int]
    num_workers: Any
    drop_last: bool
    persistent_workers: bool
    val_fraction: float
    test_fraction: float
    split_seed: int
    limit_samples: Optional[int]
    num_samples: Optional[int]
    num_classes: Optional[int]
    classes: Optional[list[Any]]
    samples_per_class: Optional[int]
    on_device: bool
    imbalance: Optional[float]
    balance: str
    cache: str
    cache_dir: Optional[str]
    cache_max_memory: float
    cache_check: str
    manifest: Optional[str]
    path_column: str
    label_column: Any  # a column name, or a list of 0/1 class columns (multi-label)
    manifest_errors: str

    def check(self) -> None:
        at_least("data.imbalance", self.imbalance, 1.0)
        one_of("data.balance", self.balance, values.BALANCES)
        if self.balance == "sampler" and self.on_device:
            raise UserError("data.balance=sampler draws through a DataLoader; set data.on_device=false")
        if self.source is None:
            one_of("data.name", self.name, (*values.DATASETS, *DATA_OPTIONS))
        check_size(self.image_size)
        at_least("data.batch_size", self.batch_size, 1)
        check_workers(self.num_workers)
        at_least("data.eval_batch_size", self.eval_batch_size, 1)
        if self.channels is not None:
            one_of("data.channels", self.channels, (1, 3))
        check_fractions(self.val_fraction, self.test_fraction)
        one_of("data.cache", self.cache, values.CACHE_MODES)
        at_least("data.cache_max_memory", self.cache_max_memory, 0)
        one_of("data.cache_check", self.cache_check, values.CACHE_CHECKS)
        one_of("data.manifest_errors", self.manifest_errors, values.MANIFEST_ERRORS)
        if self.path_column == self.label_column:
            raise UserError(f"data.path_column and data.label_column are both '{self.path_column}'; name two columns")
        finite_list("data.mean", self.mean)
        finite_list("data.std", self.std)
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise UserError("data.mean and data.std must both be null or lists of the same length")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UserError(f"data.std={list(self.std)} must be positive")
        at_least("data.limit_samples", self.limit_samples, 1)
        at_least("data.samples_per_class", self.samples_per_class, 1)
        if self.classes is not None and len(self.classes) < 2:
            raise UserError(f"data.classes={list(self.classes)} picks fewer than 2 classes; a classifier needs two")
        if self.classes is not None and len(set(map(str, self.classes))) != len(self.classes):
            raise UserError(f"data.classes={list(self.classes)} names a class twice; list each class once")
        if self.name == "synthetic" and self.source is None:
            for key in ("num_samples", "num_classes"):
                if (value := getattr(self, key)) is None or value < 2:
                    raise UserError(f"data.{key}={value} is out of range; data=synthetic needs at least 2")


@dataclass
class ShardsSection:
    """`data.shards` of data=shards."""

    train: Optional[str]
    val: Optional[str]
    test: Optional[str]
    buffer: int
    image_keys: str
    label_key: str

    def check(self, data: Any) -> None:
        for key in ("train", "val", "test"):
            if getattr(self, key) is None:
                raise UserError(
                    f"data.shards.{key}: not set; give its shards, e.g. data.shards.{key}=DIR/{key}-{{000000..000009}}"
                    ".tar (shelltrain-shards writes train, val and test shards)"
                )
        at_least("data.shards.buffer", self.buffer, 1)
        if not self.image_keys.strip(";"):
            raise UserError("data.shards.image_keys is empty; name the image extensions, e.g. jpg;png")
        for key, (allowed, fix) in _NOT_STREAMED.items():
            if getattr(data, key) != allowed:
                raise UserError(f"data.{key}={getattr(data, key)} does not apply to data=shards: {fix}")


@dataclass
class HFSection:
    """`data.hf` of data=hf."""

    path: Optional[str]
    image_column: str
    label_column: str
    train_split: str
    val_split: Optional[str]
    test_split: Optional[str]

    def check(self, data: Any) -> None:
        if self.path is None:
            raise UserError("data.hf.path: not set; point it at a folder written by datasets' save_to_disk")
        if self.image_column == self.label_column:
            raise UserError(f"data.hf.image_column and data.hf.label_column are both '{self.label_column}'")
        for key in ("cache", "on_device"):  # the Arrow files are memory-mapped already; rows decode as drawn
            allowed, fix = _NOT_STREAMED[key]
            if getattr(data, key) != allowed:
                raise UserError(f"data.{key}={getattr(data, key)} does not apply to data=hf: {fix.split('; ')[-1]}")


@dataclass
class OutputConfig:
    """The `output` block: where a finished run is copied besides its run directory."""

    mirror: Optional[str]

    def check(self) -> None:
        if self.mirror is not None and not is_url(self.mirror):
            raise UserError(
                f"output.mirror={self.mirror!r} is not a URL; give a prefix such as s3://bucket/runs (the run "
                "directory itself is the local copy)"
            )


class WithSection:
    """A data option's group (DATA_OPTIONS): the data group's checks, then those of its own section."""

    def check(self) -> None:
        super().check()
        getattr(self, self.name).check(self)


# data option with a section of its own -> the data group plus that section, stored as `data_<name>_schema`
DATA_OPTIONS = {
    name: make_dataclass(f"{name}_data", [(name, section)], bases=(WithSection, DataConfig))
    for name, section in (("shards", ShardsSection), ("hf", HFSection))
}


def check_data(node: DictConfig, files: bool = True) -> None:
    """The data group's checks, and with `files` that data.root is there, so that a mistyped path is named before
    torch is imported. build_data() runs them too, for callers that skip validate()."""
    data = to_schema(node, DATA_OPTIONS.get(node.name, DataConfig) if node.source is None else DataConfig, "data")
    data.check()
    if files and data.source is None and (data.name in DATASET_FILES or data.name == "imagefolder"):
        check_data_root(node)
