"""A fingerprint of the data each split of a run actually used, recorded in summary.json (`data_fingerprint`), so
that two runs can be shown to have tested on the same images: the baseline gate and `shelltrain-compare` ask it.

Per split: how many samples, `membership` (a hash of the sorted sample ids with their labels: which images, in any
order) and `content` (image files: a hash of each file's relative path and size, no file is read; images held in
memory: a hash of the pixel bytes and labels in order), and for files `mtimes` (a hash of the modification times,
reported, not compared: a copied data set keeps its sizes but not its times). Plus the `split_seed`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from shelltrain.data.datasets import FileImages, TensorImages
from shelltrain.significance import relative_ids

SPLITS = ("train", "val", "test")


def fingerprint(bundle: Any, split_seed: int) -> dict[str, Any]:
    """summary.json's data_fingerprint of a DataBundle (loaders or device batches): one entry per split."""
    record: dict[str, Any] = {"split_seed": int(split_seed)}
    for split in SPLITS:
        record[split] = split_fingerprint(getattr(bundle, split).dataset)
    return record


def split_fingerprint(dataset: Dataset) -> dict[str, Any]:
    """One split's entry: files by relative path and size (stat only), in-memory images by their bytes."""
    index: list[int] | None = None
    if isinstance(dataset, Subset):  # a cross-validation fold
        index, dataset = [int(i) for i in dataset.indices], dataset.dataset
    if not isinstance(dataset, (FileImages, TensorImages)):  # another kind (streamed shards, ...): matches no split
        return {"kind": type(dataset).__name__, "count": len(index) if index is not None else _size(dataset)}
    labels = dataset.labels.tolist()
    if isinstance(dataset, FileImages):
        picked = range(len(labels)) if index is None else index
        return _files([dataset.paths[i] for i in picked], [labels[i] for i in picked])
    images = dataset.stacked() if index is None else dataset.stacked()[index]
    return _tensors(images, labels if index is None else [labels[i] for i in index])


def _size(dataset: Dataset) -> int | None:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:  # a stream without a length
        return None


def _files(paths: list[str], labels: list[int]) -> dict[str, Any]:
    ids = relative_ids([str(p) for p in paths])
    stats = [os.stat(p) for p in paths]
    rows = sorted(zip(ids, labels, (s.st_size for s in stats), (s.st_mtime_ns for s in stats)))
    return {
        "kind": "files",
        "count": len(rows),
        "bytes": sum(r[2] for r in rows),
        "membership": _digest(f"{i}\t{y}" for i, y, _, _ in rows),
        "content": _digest(f"{i}\t{size}" for i, _, size, _ in rows),
        "mtimes": _digest(str(t) for *_, t in rows),
    }


def _tensors(images: torch.Tensor, labels: list[int]) -> dict[str, Any]:
    flat = images.contiguous().reshape(len(labels), -1).numpy() if len(labels) else None
    samples = [hashlib.blake2b(flat[i].tobytes(), digest_size=16).hexdigest() for i in range(len(labels))]
    ordered = hashlib.blake2b(digest_size=16)
    if flat is not None:
        ordered.update(str(tuple(images.shape)).encode())
        ordered.update(flat.tobytes())
    ordered.update(torch.tensor(labels, dtype=torch.int64).numpy().tobytes())
    return {
        "kind": "tensor",
        "count": len(labels),
        "membership": _digest(sorted(f"{h}\t{y}" for h, y in zip(samples, labels))),
        "content": ordered.hexdigest(),
    }


def _digest(lines: Iterable[str]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for line in lines:
        hasher.update(line.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()
