"""Shard input vs the image-folder path on the same images: the train loader of data=shards (WebDataset tar shards
written by shelltrain-shards) against data=imagefolder's (one file per image), decode + resize + normalize, no model.
`python benchmarks/shards.py [--count 2000] [--side 96] [--size 64] [--workers 2] [--rounds 3] [--s3]` prints the images
per second of one epoch of each, the median of alternating rounds (folder, shards, folder, ...) with the spread.
`--s3` also serves both from a local S3 API server (moto's, in this process: far slower than a real object store, so
only the relative costs mean anything): the image folder's one-time copy to the data cache, the check a later run
makes, and the shards streamed from s3://."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module
from PIL import Image

from shelltrain.data import build_data
from shelltrain.data.shard_writer import write_shards
from shelltrain.dataroot import local_copy


def make_folder(root: Path, count: int, side: int) -> None:
    """`count` photo-like JPEGs of `side` px in 10 class folders under root/train/."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = np.kron(np.roll(base, i, axis=0), np.ones((8, 8, 1), dtype=np.uint8))
        noisy = np.clip(smooth + rng.integers(-12, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i}.jpg", quality=90)


def epoch_rate(overrides: list[str]) -> float:
    """Images per second of one epoch of the train loader (its start included: workers, shard opening)."""
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    bundle = build_data(cfg.data, cfg.augmentation, seed=0)
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in bundle.train)
    return seen / (time.perf_counter() - start)


def s3_figures(tmp: Path, shard_overrides: list[str], common: list[str], rounds: int) -> None:
    """The image folder and the shards put on a local S3 API server: copy and re-check times, shard img/s."""
    import s3fs
    from moto.server import ThreadedMotoServer
    from omegaconf import OmegaConf

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}"
    )
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(f"{tmp}/images/", "bench/images/", recursive=True)
    fs.put(f"{tmp}/shards/", "bench/shards/", recursive=True)
    data = OmegaConf.create({"cache_dir": str(tmp / "cache")})
    for label in ("first run: copy the image folder to the data cache", "a later run: check the copy (sizes)"):
        start = time.perf_counter()
        local_copy("s3://bench/images", "data.root", data)
        print(f"  s3 image folder, {label}: {time.perf_counter() - start:.1f} s")
    streamed = [o.replace(str(tmp / "shards"), "s3://bench/shards") for o in shard_overrides]
    rates = [epoch_rate(["data=shards", *common, *streamed]) for _ in range(rounds)]
    print(
        f"  s3 shards, streamed: {statistics.median(rates):.0f} img/s (rounds: {', '.join(f'{v:.0f}' for v in rates)})"
    )
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also from a local S3 API server (moto)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        make_folder(folder, args.count, args.side)
        index = write_shards(folder, shards, maxcount=250, maxsize=1e9, seed=0)
        last = {
            s: max(n for n in index["counts"] if n.startswith(f"{s}-"))[len(s) + 1 : -4]
            for s in ("train", "val", "test")
        }
        common = [f"data.image_size={args.size}", f"data.num_workers={args.workers}", "data.batch_size=64"]
        common += ["data.mean=[0.5]", "data.std=[0.25]", "augmentation=none"]
        shard_overrides = [
            f'data.shards.{s}="{shards}/{s}-{{000000..{last[s]}}}.tar"' for s in ("train", "val", "test")
        ]
        runs = {
            "image folder": ["data=imagefolder", f"data.root={folder}", *common],
            "shards": ["data=shards", *common, *shard_overrides],
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, overrides in runs.items():
                rates[name].append(epoch_rate(overrides))
        train = sum(n for name, n in index["counts"].items() if name.startswith("train-"))
        print(f"{train} train images, {args.side}px JPEG -> {args.size}px, {args.workers} workers, batch 64:")
        for name, values in rates.items():
            print(
                f"  {name:12s} {statistics.median(values):7.0f} img/s (rounds: {', '.join(f'{v:.0f}' for v in values)})"
            )
        if args.s3:
            s3_figures(Path(tmp), shard_overrides, common, args.rounds)


if __name__ == "__main__":
    main()
