"""How long data=manifest takes to read a large label file before training starts. Writes a CSV of `--rows` rows
(path, label, split, group) and times, `--repeats` times each, what a run does with it before any image is
decoded: parsing and checking the rows (labels, splits, duplicates; the paths need not exist) into per-split label
and group tensors, and the same plus the per-file existence check over real (empty) files.
`python benchmarks/manifest.py [--rows 1000000] [--repeats 3] [--classes 100]` prints the median and the spread."""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from shelltrain.data.manifest import manifest_sources


def write_rows(folder: Path, rows: int, classes: int) -> Path:
    """labels.csv listing images/<shard>/<i>.png in 1000-file folders, with a class, a split and a group each."""
    path = folder / "labels.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "group"])
        for i in range(rows):
            split = ("train", "train", "train", "val", "test")[i % 5]
            writer.writerow([f"images/{i // 1000}/{i}.png", f"class{i % classes}", split, f"patient{i // 7}"])
    return path


def make_files(folder: Path, rows: int) -> None:
    """The listed files, empty: the existence check looks at each one's metadata only."""
    for start in range(0, rows, 1000):
        shard = folder / "images" / str(start // 1000)
        shard.mkdir(parents=True)
        for i in range(start, min(start + 1000, rows)):
            os.close(os.open(shard / f"{i}.png", os.O_CREAT | os.O_WRONLY))


def timed(data, check_files: bool, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        sources, _, groups = manifest_sources(data, check_files=check_files)
        seconds.append(time.perf_counter() - started)
        assert set(sources) == set(groups) == {"train", "val", "test"}
    return seconds


def describe(name: str, seconds: list[float], rows: int) -> str:
    median = statistics.median(seconds)
    return (
        f"{name}: median {median:.2f} s of {len(seconds)} (spread {min(seconds):.2f}-{max(seconds):.2f} s), "
        f"{rows / median / 1e6:.2f} M rows/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_rows(folder, args.rows, args.classes)
        data = OmegaConf.create(
            {
                "manifest": str(manifest),
                "root": None,
                "path_column": "path",
                "label_column": "label",
                "manifest_errors": "error",
                "classes": None,
            }
        )
        parse = timed(data, check_files=False, repeats=args.repeats)
        print(describe(f"parse + check {args.rows} rows (no file access)", parse, args.rows))
        started = time.perf_counter()
        make_files(folder, args.rows)
        print(f"(wrote {args.rows} empty files in {time.perf_counter() - started:.1f} s)")
        full = timed(data, check_files=True, repeats=args.repeats)
        print(describe(f"parse + check + file existence, {args.rows} rows", full, args.rows))
        checked = [b - a for a, b in zip(sorted(parse), sorted(full))]
        print(f"file existence alone (sorted pairwise difference): median {statistics.median(checked):.2f} s")


if __name__ == "__main__":
    main()
