"""A tiny Hugging Face dataset written with save_to_disk, for data=hf: grey 10x12 images whose brightness says the
class (a ClassLabel: dark, light)."""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image


def _pictures(count: int, offset: int = 0) -> tuple[list[Image.Image], list[int]]:
    """Grey 10x12 images whose brightness says the class (0: dark, 1: light), with an id in pixel (0, 0)."""
    labels = [i % 2 for i in range(count)]
    images = []
    for i, y in enumerate(labels):
        pixels = np.full((12, 10), 50 + 150 * y, dtype=np.uint8)
        pixels[0, 0] = offset + i
        images.append(Image.fromarray(pixels, "L"))
    return images, labels


def save(folder, splits=("train", "validation", "test"), counts=(40, 10, 10)):
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["dark", "light"])})
    parts = {}
    for n, (split, count) in enumerate(zip(splits, counts)):
        images, labels = _pictures(count, offset=100 * n)
        parts[split] = datasets.Dataset.from_dict({"img": images, "kind": labels}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


HF = ["data=hf", "data.hf.image_column=img", "data.hf.label_column=kind", "data.image_size=8", "data.num_workers=0"]
