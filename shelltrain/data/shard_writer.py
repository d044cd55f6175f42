"""`shelltrain-shards SOURCE OUT`: WebDataset tar shards for data=shards, written with webdataset's ShardWriter from
an image folder (train/<class>/..., optional val/ and test/) or a label file (data=manifest's CSV, TSV or JSON
lines). Each image's file goes in as it is (no re-encoding) with its class index as `<key>.cls`; the samples of
a split are shuffled (seeded) before they are written, so that every shard holds a mix of classes. A split the
source lacks is carved out of train as a run would carve it (data.val_fraction, data.test_fraction, stratified).
OUT/shards.json records the classes and each shard's sample count, so that runs need no counting pass."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from shelltrain.data.manifest import manifest_sources
from shelltrain.data.shards import INDEX
from shelltrain.data.sources import imagefolder
from shelltrain.data.splits import split_indices
from shelltrain.errors import EXIT_USER_ERROR, UserError
from shelltrain.schema import packaged

SPLITS = ("train", "val", "test")


def source_config(source: Path) -> DictConfig:
    """The data group a run would use to read `source` (a folder: data=imagefolder, a file: data=manifest), with
    the packaged defaults for the split fractions and seed."""
    data = packaged("data")
    if source.is_dir():
        data.name, data.root = "imagefolder", str(source)
    else:
        data.name, data.manifest, data.root = "manifest", str(source), None
    return data


def read_source(source: Path) -> tuple[dict[str, tuple[list[str], torch.Tensor]], list[str]]:
    """Per split (train, val, test; carved from train where the source lacks one), the image files and labels."""
    data = source_config(source)
    if data.name == "imagefolder":
        if not (source / "train").is_dir():
            raise UserError(f"SOURCE: '{source}' has no train/ folder; lay it out as train/<class>/<image>")
        sources, classes = imagefolder(data)
    else:
        sources, classes, _ = manifest_sources(data)
    labels = {split: y for split, (_, y) in sources.items()}
    splits = {}
    for split, (origin, index) in split_indices(labels, data).items():
        paths = sources[origin][0]
        splits[split] = ([paths[i] for i in index.tolist()], labels[origin][index])
    return splits, classes


def write_split(
    paths: list[str], labels: torch.Tensor, pattern: str, maxcount: int, maxsize: float, seed: int
) -> dict[str, int]:
    """One split's samples, shuffled with `seed`, into shards named by `pattern`; each file written and its sample
    count, in the order written (counted as written: no shard is read back)."""
    import webdataset as wds

    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    counts: dict[str, int] = {}
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as writer:
        for n, i in enumerate(order):
            suffix = Path(paths[i]).suffix.lower().lstrip(".") or "img"
            with open(paths[i], "rb") as handle:
                writer.write({"__key__": f"{n:09d}", suffix: handle.read(), "cls": str(int(labels[i]))})
            counts[writer.fname] = counts.get(writer.fname, 0) + 1  # the shard this sample went into
    return counts


def write_shards(source: Path, out: Path, maxcount: int, maxsize: float, seed: int) -> dict:
    """Every split of `source` as shards in `out`, and `out`/shards.json; returns what shards.json holds."""
    splits, classes = read_source(source)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        paths, labels = splits[split]
        written = write_split(paths, labels, str(out / f"{split}-%06d.tar"), maxcount, maxsize, seed)
        counts.update({os.path.basename(file): n for file, n in written.items()})
    index = {"classes": classes, "counts": counts}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shelltrain-shards",
        description="Write WebDataset tar shards (train-, val-, test-NNNNNN.tar and shards.json) for data=shards.",
    )
    parser.add_argument(
        "source", type=Path, help="an image folder (train/<class>/...) or a .csv/.tsv/.jsonl label file"
    )
    parser.add_argument("out", type=Path, help="the folder the shards are written to")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    parser.add_argument("--seed", type=int, default=0, help="the order of the samples in the shards (default 0)")
    args = parser.parse_args(argv)
    try:
        if args.maxcount < 1 or args.maxsize < 1:
            raise UserError("--maxcount and --maxsize must be at least 1")
        index = write_shards(args.source.absolute(), args.out.absolute(), args.maxcount, args.maxsize, args.seed)
    except UserError as e:
        print(f"shelltrain-shards: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    for split in SPLITS:
        names = sorted(name for name in index["counts"] if name.startswith(f"{split}-"))
        total = sum(index["counts"][name] for name in names)
        first, last = names[0][len(split) + 1 : -4], names[-1][len(split) + 1 : -4]
        pattern = f"{args.out}/{split}-{first}.tar" if first == last else f"{args.out}/{split}-{{{first}..{last}}}.tar"
        print(f"'data.shards.{split}=\"{pattern}\"'  # {total} samples in {len(names)} shards")
    return 0
