"""Where images come from: every `data` option read into uint8 images (or image files) and integer labels per
source split, with the class names. `data.source` (a `_target_`) plugs in a user's dataset without editing this
closed list: see `user_source`."""

from __future__ import annotations

import importlib.util
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from shelltrain.dataroot import DATASET_FILES, data_root
from shelltrain.errors import UserError
from shelltrain.imagesize import size_hw
from shelltrain.remote import one_line

Sources = dict[str, tuple[torch.Tensor, torch.Tensor]]


# data.name -> torchvision class (dataroot.DATASET_FILES: its name in messages and what it expects under data.root)
_TORCHVISION = {
    "cifar10": datasets.CIFAR10,
    "cifar100": datasets.CIFAR100,
    "mnist": datasets.MNIST,
    "fashion_mnist": datasets.FashionMNIST,
}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (N x 8 x 8 values 0..16, labels), read from the CSV it ships as load_digits reads
    it, without importing scikit-learn: that imports pandas, pyarrow and scipy.stats (a second on 2 cores)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data=digits needs scikit-learn, which ships the digits: pip install scikit-learn")
    data = np.loadtxt(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def in_memory(data: DictConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Native-size uint8 N x C x H x W images and labels per source split, and the class names."""
    if data.source is not None:
        return user_source(data)
    if data.name == "digits":
        digits, target = digits_arrays()  # 8x8 grey images with values 0..16
        images = torch.from_numpy(digits * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
        return {"train": (images, torch.from_numpy(target).long())}, [str(c) for c in range(10)]
    if data.name == "synthetic":
        generator = torch.Generator().manual_seed(data.split_seed)
        n, (height, width) = data.num_samples, size_hw(data.image_size)
        images = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator)
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
                    f"data.download: could not download {title} into '{root}' ({one_line(e)}); "
                    f"check the network or place {expected} under data.root by hand"
                ) from e
            folder = root / getattr(cls, "base_folder", "")
            if folder != root and folder.is_dir() and "corrupted" in str(e):  # CIFAR: the files' md5 is checked
                raise UserError(
                    f"data.root: the {title} files in '{folder}' fail torchvision's checksum (md5): a partial download "
                    f"or changed files; delete '{folder}' and set data.download=true, or put fresh copies there"
                ) from e
            raise UserError(
                f"data.root: no readable {title} in '{root}' ({one_line(e)}); "
                f"point data.root at the folder that holds {expected} or set data.download=true"
            ) from e
        images = torch.as_tensor(dataset.data)
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)  # NHWC (CIFAR) or NHW
        sources[split] = (images, torch.as_tensor(dataset.targets, dtype=torch.long))
    return sources, list(dataset.classes)


def imagefolder(data: DictConfig) -> tuple[dict[str, tuple[list[str], torch.Tensor]], list[str]]:
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
            message = f"data.root: no images in '{folder}' ({one_line(e)}); put them in {folder}/<class>/"
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


_FAST_SUFFIXES = (".jpg", ".jpeg", ".png")
# torchvision 0.29 warns on every decode that TorchCodec will take decoding over; nothing for the user to do
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
GREY_MODES = ("1", "L", "I", "I;16")  # PIL modes of single-channel images
_SAMPLED_FILES = 64  # files opened (headers only) to tell grey folders and native sizes


def sample_files(paths: list[str]) -> tuple[bool, list[int]]:
    """Whether every sampled file (spread evenly over `paths`) is a grey image, and their shorter sides."""
    step = max(1, len(paths) // _SAMPLED_FILES)
    modes, sides = [], []
    for path in paths[::step][:_SAMPLED_FILES]:
        with Image.open(path) as image:  # reads the header: mode and size, no pixels
            modes.append(image.mode)
            sides.append(min(image.size))
    return all(mode in GREY_MODES for mode in modes), sides


def _verify_images(paths: list[str]) -> None:
    """Open every file once so that a broken one is named now, not mid-epoch inside a worker."""
    for path in paths:
        _check_regular(path)
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... depending on the damage
            message = f"data.root: '{path}' is not a readable image ({one_line(e)}); delete or replace it"
            raise UserError(message) from e


def _check_regular(path: str) -> None:
    """Refuse a named pipe, socket or device among the images: opening a pipe waits for a writer forever."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:  # a dangling link, a file removed meanwhile
        raise UserError(f"data.root: '{path}' cannot be read ({e.strerror or e}); delete or replace it") from e
    if not regular:
        raise UserError(
            f"data.root: '{path}' is not a regular file (a named pipe, socket or device); "
            "move it out of the image folder"
        )


def decode(path: str, mode: str, key: str = "data.root") -> torch.Tensor:
    """One image file as uint8 C x H x W in PIL `mode` ("RGB" or "L"). JPEG and PNG go through torchvision's
    decoder in RGB (libjpeg-turbo/libpng: 1.0-1.6x PIL's rate here, benchmarks/decode.py); grey ("L") and other
    formats through PIL, whose grey conversion the values keep."""
    try:
        if mode == "RGB" and path.lower().endswith(_FAST_SUFFIXES):
            pixels = decode_image(path, mode=ImageReadMode.RGB)
            if pixels.dtype == torch.uint8:
                return pixels
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert(mode))
    except Exception as e:  # truncated/corrupt files: torchvision raises RuntimeError, PIL many types
        raise UserError(f"{key}: '{path}' cannot be decoded ({one_line(e)}); delete or replace it") from e


def decode_bytes(data: bytes, name: str, mode: str, key: str) -> torch.Tensor:
    """An image's bytes (a shard member, a dataset cell) as uint8 C x H x W in PIL `mode`, by `decode`'s rule: JPEG
    and PNG in RGB through torchvision's decoder, the rest through PIL. `name` says the format and names the image
    in the message about a broken one."""
    try:
        if mode == "RGB" and name.lower().endswith(_FAST_SUFFIXES):
            pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if pixels.dtype == torch.uint8:
                return pixels
        with Image.open(io.BytesIO(data)) as image:
            return F.pil_to_tensor(image.convert(mode))
    except Exception as e:  # truncated/corrupt bytes: torchvision raises RuntimeError, PIL many types
        raise UserError(f"{key}: '{name}' cannot be decoded ({one_line(e)}); rewrite that sample") from e


def user_source(data: DictConfig) -> tuple[Sources, list[str]]:
    """`data.source`: a `_target_` naming a user's function (the node's other keys are its arguments) that returns
    `(splits, classes)`: `splits` maps "train" (and, when the dataset has them, "val" and "test") to
    `(images, labels)`, images N x C x H x W or N x H x W, uint8 or float in [0, 1], labels 0..len(classes)-1.
    What a split lacks is carved out of train, as for the built-in datasets."""
    target = data.source.get("_target_")
    try:
        splits, classes = instantiate(data.source, _convert_="all")
    except Exception as e:  # hydra wraps import and argument errors; the cause says what is wrong
        raise UserError(
            f"data.source: cannot load {target!r} ({one_line(e.__cause__ or e)}); fix its _target_ or arguments; "
            "it must return (splits, classes)"
        ) from e
    if not isinstance(splits, dict) or "train" not in splits:
        raise UserError(
            f"data.source: {target!r} returned no 'train' split; return ({{'train': (images, labels), ...}}, classes)"
        )
    return {split: _uint8_images(*pair) for split, pair in splits.items()}, [str(c) for c in classes]


def _uint8_images(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N x C x H x W uint8 images (floats in [0, 1] scaled, grey N x H x W given a channel) and long labels."""
    images = torch.as_tensor(images)
    if images.is_floating_point():
        images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    return images.to(torch.uint8), torch.as_tensor(labels, dtype=torch.long)
