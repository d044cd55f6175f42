"""PIL vs torchvision.io.decode_image on the files of an image folder: decode + resize to a square uint8 tensor,
as data.FileImages does. `python benchmarks/decode.py [--count 400] [--side 128]` prints files/s per format."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F


def make_files(folder: Path, count: int, side: int, suffix: str) -> list[str]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(count):
        smooth = np.kron(np.roll(base, i, axis=0), np.ones((8, 8, 1), dtype=np.uint8))  # photo-like: compressible
        noisy = np.clip(smooth + rng.integers(-12, 12, smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i}.{suffix}"
        Image.fromarray(noisy).save(path, quality=90) if suffix == "jpg" else Image.fromarray(noisy).save(path)
        paths.append(str(path))
    return paths


def with_pil(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        return F.pil_to_tensor(image.convert("RGB"))


def with_torchvision(path: str) -> torch.Tensor:
    return decode_image(path, mode=ImageReadMode.RGB)


def rate(decode, paths: list[str], size: int) -> float:
    start = time.perf_counter()
    for path in paths:
        F.center_crop(F.resize(decode(path), [size], antialias=True), [size, size])
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in ("jpg", "png"):
            paths = make_files(Path(tmp), args.count, args.side, suffix)
            for _ in range(2):  # second round: files in the page cache, code warm
                pil, tv = rate(with_pil, paths, args.size), rate(with_torchvision, paths, args.size)
            print(
                f"{suffix} {args.side}px -> {args.size}px: PIL {pil:.0f} files/s, decode_image {tv:.0f} files/s "
                f"({tv / pil:.2f}x)"
            )


if __name__ == "__main__":
    main()
