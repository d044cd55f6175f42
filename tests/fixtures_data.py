"""Tiny datasets written in the real on-disk formats, so tests load them through the real torchvision/PIL code.

Every image is a flat grey level that encodes its label (`level(label, num_classes)`), so a test can read the
label back from pixels after splitting, resizing and channel conversion (`label_of`).
"""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets


def level(label: int, num_classes: int) -> int:
    """Grey level 20..235 for a label: evenly spaced, so neighbours differ by >= 2 levels up to 100 classes."""
    return 20 + (215 * label) // max(num_classes - 1, 1)


def label_of(image: torch.Tensor, num_classes: int, mean=(0.0,), std=(1.0,)) -> int:
    """The label whose level is nearest to an image's (un-normalized) average brightness."""
    channels = image.shape[0]
    mean = torch.tensor(mean).expand(channels).view(-1, 1, 1)
    std = torch.tensor(std).expand(channels).view(-1, 1, 1)
    value = float(((image * std + mean) * 255).mean())
    return min(range(num_classes), key=lambda k: abs(level(k, num_classes) - value))


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """Balanced labels in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def _grey_images(labels: np.ndarray, num_classes: int, shape: tuple[int, ...]) -> np.ndarray:
    levels = np.array([level(int(y), num_classes) for y in labels], dtype=np.uint8)
    return np.broadcast_to(levels.reshape(-1, *[1] * len(shape)), (len(labels), *shape)).copy()


def _trust_written_files(monkeypatch, cls: type, folder: Path) -> None:
    """torchvision's CIFAR classes compare every file with the md5 of the real download, even with download=False
    (`_check_integrity` in __init__, `check_integrity` in `_load_meta`). Point those md5s at the files just written,
    so the real integrity check and loading code still run."""

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[name, md5(name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def _write_cifar(folder: Path, batches: dict[str, np.ndarray], labels_key: str, num_classes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, labels in batches.items():
        pixels = _grey_images(labels, num_classes, (3, 32, 32)).reshape(len(labels), -1)  # rows of R, G, B planes
        entry = {"batch_label": name, "data": pixels, labels_key: labels.tolist(), "filenames": [""] * len(labels)}
        (folder / name).write_bytes(pickle.dumps(entry))


def make_cifar10(root: Path, n_train: int = 100, n_test: int = 40, monkeypatch=None, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) as the real python pickles.

    Pass pytest's `monkeypatch` to make torchvision accept the files (see `_trust_written_files`); without it the
    real class rejects them as corrupted, which is what a broken download looks like."""
    folder = Path(root) / "cifar-10-batches-py"
    labels = _labels(n_train, 10, seed)
    batches = {f"data_batch_{i + 1}": part for i, part in enumerate(np.array_split(labels, 5))}
    batches["test_batch"] = _labels(n_test, 10, seed + 1)
    _write_cifar(folder, batches, "labels", 10)
    names = [f"class{k}" for k in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": n_train // 5}))
    if monkeypatch is not None:
        _trust_written_files(monkeypatch, datasets.CIFAR10, folder)
    return Path(root)


def make_cifar100(root: Path, n_train: int = 300, n_test: int = 100, monkeypatch=None, seed: int = 0) -> Path:
    """Write root/cifar-100-python/ (train, test, meta) as the real python pickles; `monkeypatch` as in make_cifar10."""
    folder = Path(root) / "cifar-100-python"
    batches = {"train": _labels(n_train, 100, seed), "test": _labels(n_test, 100, seed + 1)}
    _write_cifar(folder, batches, "fine_labels", 100)
    names = {"fine_label_names": [f"fine{k}" for k in range(100)], "coarse_label_names": [f"c{k}" for k in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(names))
    if monkeypatch is not None:
        _trust_written_files(monkeypatch, datasets.CIFAR100, folder)
    return Path(root)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic (0, 0, 0x08 = ubyte, number of dims), big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, n_train: int = 100, n_test: int = 40, name: str = "MNIST", seed: int = 0) -> Path:
    """Write root/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, the files torchvision's MNIST reads
    (it only checks that they exist, so no patching is needed). name="FashionMNIST" for Fashion-MNIST."""
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, split_seed in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        labels = _labels(n, 10, split_seed)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _grey_images(labels, 10, (28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


def make_fashion_mnist(root: Path, n_train: int = 100, n_test: int = 40, seed: int = 0) -> Path:
    return make_mnist(root, n_train, n_test, name="FashionMNIST", seed=seed)


def make_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 10,
    splits: tuple[str, ...] = ("train",),
    size: tuple[int, int] = (40, 30),
    mode: str = "RGB",
) -> Path:
    """Write root/<split>/<class>/<i>.png: per_class PNGs of `size` (width, height) per class and split."""
    for split in splits:
        for label, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            grey = level(label, len(classes))
            for i in range(per_class):
                Image.new(mode, size, grey if mode == "L" else (grey, grey, grey)).save(folder / f"{i}.png")
    return Path(root)


def make_manifest_images(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 10,
    groups: int | None = None,
    size: tuple[int, int] = (16, 16),
) -> list[dict[str, str]]:
    """Write root/images/<class>_<i>.png (flat grey levels of the label) and return one manifest row per image:
    path (relative to root), label, and with `groups` a group (`g0`.. cycling within each class, so that a group
    holds one class's images)."""
    rows = []
    (Path(root) / "images").mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(classes):
        grey = level(label, len(classes))
        for i in range(per_class):
            path = f"images/{name}_{i}.png"
            Image.new("RGB", size, (grey, grey, grey)).save(Path(root) / path)
            row = {"path": path, "label": name}
            if groups is not None:
                row["group"] = f"{name}-g{i % groups}"
            rows.append(row)
    return rows


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write `rows` as a CSV, TSV or JSON-lines manifest, chosen by the suffix of `path`."""
    import csv
    import json

    path = Path(path)
    with open(path, "w", newline="") as handle:
        if path.suffix == ".jsonl":
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            writer = csv.DictWriter(handle, list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return path
