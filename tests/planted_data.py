"""Digits with planted errors, for the audit's test and benchmark (a `data.source`): a share of the train labels
flipped at random and some test images copied into train, exactly, re-encoded as JPEG, or slightly resized.

`planted(...)` returns the splits and the truth; `load(...)` is the data.source entry point (the splits only).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

SIDE = 32  # the 8x8 digits are scaled up to this, so that a resized copy differs from its original
KINDS = ("exact", "jpeg", "resized")


def planted(
    seed: int = 0, flip: float = 0.05, copies: int = 20, limit: int | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str], dict]:
    """Train/val/test splits of digits (70/10/20 %, seeded), `flip` of the original train labels changed to
    another class and `copies` test images appended to train (kinds in turn: exact, JPEG q=75, resized 29 px and
    back). The truth: {"flipped": train indices, "copies": [(train index, test index, kind)]}."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    images = np.stack([_upscale((x * 255 / 16).astype(np.uint8)) for x in digits.images])
    labels = digits.target.astype(np.int64)
    order = rng.permutation(len(labels))[:limit] if limit else rng.permutation(len(labels))
    n_test, n_val = int(0.2 * len(order)), int(0.1 * len(order))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    y_train = labels[train].copy()
    flipped = rng.choice(len(train), size=round(flip * len(train)), replace=False)
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    picked = rng.choice(len(test), size=copies, replace=False)
    copied = [_copy(images[test[t]], KINDS[k % len(KINDS)]) for k, t in enumerate(picked)]
    x_train = np.concatenate([images[train], np.stack(copied)]) if copies else images[train]
    y_train = np.concatenate([y_train, labels[test][picked]])
    truth = {
        "flipped": sorted(int(i) for i in flipped),
        "copies": [(len(train) + k, int(t), KINDS[k % len(KINDS)]) for k, t in enumerate(picked)],
    }
    splits = {"train": (x_train, y_train), "val": (images[val], labels[val]), "test": (images[test], labels[test])}
    tensors = {k: (torch.from_numpy(x)[:, None].contiguous(), torch.from_numpy(y)) for k, (x, y) in splits.items()}
    return tensors, [str(c) for c in range(10)], truth


def load(seed: int = 0, flip: float = 0.05, copies: int = 20, limit: int | None = None):
    """data.source: the planted splits and the class names."""
    splits, classes, _ = planted(seed, flip, copies, limit)
    return splits, classes


def _upscale(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((SIDE, SIDE), Image.BILINEAR))


def _copy(image: np.ndarray, kind: str) -> np.ndarray:
    picture = Image.fromarray(image)
    if kind == "jpeg":
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=75)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
    if kind == "resized":
        return np.asarray(picture.resize((SIDE - 3, SIDE - 3), Image.BILINEAR).resize((SIDE, SIDE), Image.BILINEAR))
    return image.copy()
