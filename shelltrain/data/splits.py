"""Which images go where: train/val/test carved from the source splits with `data.split_seed` (stratified, so
splits stay fixed across trainer seed sweeps; whole groups when the data has groups, e.g. a manifest's group column),
a class subset relabelled, and a labelled budget per class."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from omegaconf import DictConfig

from shelltrain.errors import UserError


def split_indices(
    labels: dict[str, torch.Tensor], data: DictConfig, groups: torch.Tensor | None = None
) -> dict[str, tuple[str, torch.Tensor]]:
    """Map train/val/test to (source split, indices into it): carve what the source lacks out of train (test
    first, then val from the rest), then cap each split at data.limit_samples. `groups` (a group code per train
    image): carved splits take whole groups, so no group is on both sides."""
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
            if groups is None:
                train, index = _carve(labels["train"], train, carved, seed)
            else:
                train, index = carve_groups(labels["train"], groups, train, carved, seed, f"data.{split}_fraction")
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
    rest, carved = shuffle_split(index.numpy(), count, seed, stratify)
    return torch.from_numpy(rest), torch.from_numpy(carved)


def shuffle_split(
    index: np.ndarray, count: int, seed: int, stratify: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's train_test_split(index, test_size=count, random_state=seed, stratify=stratify), the same
    draws in the same order (the splits of earlier runs stay), without importing scikit-learn and pandas with it."""
    rng = np.random.RandomState(seed)
    if stratify is None:
        order = rng.permutation(len(index))
        return index[order[count:]], index[order[:count]]
    _, y = np.unique(stratify, return_inverse=True)
    counts = np.bincount(y)
    members = np.split(np.argsort(y, kind="mergesort"), np.cumsum(counts)[:-1])
    n_rest = _approximate_mode(counts, len(index) - count, rng)
    n_carved = _approximate_mode(counts - n_rest, count, rng)
    rest, carved = [], []
    for i, member in enumerate(members):
        drawn = member.take(rng.permutation(counts[i]), mode="clip")
        rest.extend(drawn[: n_rest[i]])
        carved.extend(drawn[n_rest[i] : n_rest[i] + n_carved[i]])
    return index[rng.permutation(rest)], index[rng.permutation(carved)]


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """`draws` shared out over the classes in proportion to `counts`; ties for the last ones drawn by `rng`."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if need <= 0:
            break
        (tied,) = np.where(remainder == value)
        added = min(len(tied), need)
        floored[rng.choice(tied, size=added, replace=False)] += 1
        need -= added
    return floored.astype(int)


def carve_groups(
    labels: torch.Tensor, groups: torch.Tensor, index: torch.Tensor, count: int, seed: int, key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of `index` into (rest, about `count` carved) along whole groups: one fold of scikit-learn's
    StratifiedGroupKFold with as many folds as fit `count` into `index`, so the class mix stays close where the
    groups allow it."""
    from sklearn.model_selection import StratifiedGroupKFold

    g = groups[index].numpy()
    n_groups = len(set(g.tolist()))
    if n_groups < 2:
        raise UserError(f"{key}: all {len(index)} images are one group; whole groups cannot fill two splits")
    folds = min(n_groups, max(2, round(len(index) / count)))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class smaller than the fold count only loosens the stratification
        warnings.simplefilter("ignore", UserWarning)
        rest, carved = next(splitter.split(g.reshape(-1, 1), labels[index].numpy(), g))
    if not len(rest) or not len(carved):
        raise UserError(f"{key}: {n_groups} groups cannot fill both splits; use data with more groups")
    return index[torch.from_numpy(rest)], index[torch.from_numpy(carved)]


def select_classes(
    sources: dict[str, tuple], classes: list[str], data: DictConfig
) -> tuple[dict[str, tuple], list[str]]:
    """Keep the images of data.classes (names, or indices into the dataset's classes), relabelled 0..k-1 in the
    order given."""
    wanted = data.classes
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


def budget(labels: torch.Tensor, index: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """At most `per_class` train images of each class, drawn with `seed` (the same budget for every trainer seed)."""
    order = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))]
    counts: dict[int, int] = {}
    keep = []
    for i, label in zip(order.tolist(), labels[order].tolist()):
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(i)
    return torch.tensor(sorted(keep), dtype=torch.long)
