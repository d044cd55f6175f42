"""The data fingerprint: the same images give the same entry wherever the data set lives, and a changed label,
image or membership changes it; files are only stat-ed."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from fixtures_data import make_imagefolder
from torch.utils.data import Subset

from shelltrain.data.datasets import FileImages, TensorImages
from shelltrain.data.fingerprint import split_fingerprint
from shelltrain.significance import same_split


def files_of(root: Path) -> tuple[list[str], torch.Tensor]:
    paths = sorted(str(p) for p in root.rglob("*.png"))
    return paths, torch.tensor([0 if "/cat/" in p else 1 for p in paths])


def test_a_moved_copy_is_the_same_split_and_a_changed_file_is_not(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "a", classes=("cat", "dog"), per_class=3)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new mtimes, same names and sizes
    entry = {}
    for name in ("a", "b"):
        paths, labels = files_of(tmp_path / name / "train")
        entry[name] = split_fingerprint(FileImages(paths[::-1], labels.flip(0), "RGB", 8, None))
    assert same_split(entry["a"], entry["b"]) and entry["a"]["count"] == 6
    with open(tmp_path / "b" / "train" / "cat" / "0.png", "ab") as f:
        f.write(b"x")  # one byte more
    paths, labels = files_of(tmp_path / "b" / "train")
    assert not same_split(entry["a"], split_fingerprint(FileImages(paths, labels, "RGB", 8, None)))
    paths, labels = files_of(tmp_path / "a" / "train")
    relabelled = split_fingerprint(FileImages(paths, 1 - labels, "RGB", 8, None))
    assert relabelled["membership"] != entry["a"]["membership"]


def test_in_memory_images_are_hashed_by_their_bytes() -> None:
    images = torch.randint(0, 255, (10, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10) % 3
    one = split_fingerprint(TensorImages(images, labels, None))
    assert same_split(one, split_fingerprint(TensorImages(images.clone(), labels.clone(), None)))
    changed = images.clone()
    changed[3, 0, 0, 0] ^= 1
    assert not same_split(one, split_fingerprint(TensorImages(changed, labels, None)))
    order = torch.randperm(10)
    shuffled = split_fingerprint(TensorImages(images[order], labels[order], None))
    assert shuffled["membership"] == one["membership"] and shuffled["content"] != one["content"]


def test_a_fold_is_fingerprinted_by_the_samples_it_picks() -> None:
    images = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    whole = TensorImages(images, torch.zeros(6, dtype=torch.long), None)
    fold = split_fingerprint(Subset(whole, [1, 3, 5]))
    assert fold == split_fingerprint(TensorImages(images[[1, 3, 5]], torch.zeros(3, dtype=torch.long), None))
    assert fold["count"] == 3
