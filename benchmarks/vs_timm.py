"""shelltrain against timm's train.py on the same image-folder work, whole processes in turns.

The work (before the fast-input work timm took 16.1 s here, shelltrain 20.2 s): scikit-learn's digits as PNG files,
1,437 train and 360 val images at 32x32 RGB; resnet18 (ImageNet stem), SGD momentum 0.9 at lr 0.05 with a
per-epoch cosine schedule and no warm-up; timm's defaults for the rest (weight decay 2e-5, none on norms and
biases, label smoothing 0.1); batch 64, no augmentation, channels_last, 2 loader workers, 4 epochs, CPU. Cases:
timm's train.py, shelltrain's DataLoader path, shelltrain with data.cache=memory, in turns. Printed per case: the
median wall time of the whole process (imports, data set-up, training, every validation; shelltrain also tests
once at the end), shelltrain's img/s in the epochs after the first (timm logs no epoch times) and the last
epoch's validation accuracy.

    python benchmarks/vs_timm.py --train-py PATH/TO/pytorch-image-models/train.py [--rounds 3]

timm's train.py is not in the timm package: pass the file from a checkout of the installed timm's version.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EPOCHS = 4


def make_folder(root: Path) -> None:
    """root/train/<digit>/*.png (the 1,437 train digits) and root/val/ (the 360 others), 32x32 RGB; shelltrain
    reads root/test/ too, the same files as val/ (so both tools train on the same 1,437 images)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16 * 255).astype(np.uint8)
    train, val, y_train, y_val = train_test_split(images, digits.target, test_size=0.2, random_state=0)
    for split, pictures, labels in (("train", train, y_train), ("val", val, y_val)):
        for i, (picture, label) in enumerate(zip(pictures, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).resize((32, 32), Image.NEAREST).convert("RGB").save(folder / f"{i}.png")
    os.symlink(root / "val", root / "test")


def run_timm(train_py: Path, root: Path, out: Path, seed: int) -> dict:
    args = [
        sys.executable, str(train_py), "--data-dir", str(root), "--train-split", "train", "--val-split", "val",
        "--model", "resnet18", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0",
        "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
        "--batch-size", "64", "--opt", "momentum", "--lr", "0.05", "--sched", "cosine", "--warmup-epochs", "0",
        "--epochs", str(EPOCHS), "--no-aug", "--channels-last", "--workers", "2", "--device", "cpu",
        "--no-prefetcher", "--seed", str(seed), "--output", str(out), "--experiment", "run", "--log-interval", "1000",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"timm's train.py failed:\n{done.stderr[-3000:]}")
    rows = list(csv.DictReader((out / "run" / "summary.csv").read_text().splitlines()))
    return {"wall": wall, "val_acc": float(rows[-1]["eval_top1"]) / 100, "epochs": len(rows)}


def run_shelltrain(root: Path, out: Path, seed: int, extra: list[str]) -> dict:
    args = [
        "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.mean=[0.5]", "data.std=[0.25]",
        "data.batch_size=64", "data.num_workers=2", "augmentation=none", "model=resnet18", "model.small_input=false",
        "optimizer=momentum", "optimizer.lr=0.05", "optimizer.weight_decay=2e-5", "optimizer.no_decay_norm_bias=true",
        "scheduler=cosine", "trainer.label_smoothing=0.1", f"trainer.epochs={EPOCHS}", "trainer.device=cpu",
        "plots=false", f"trainer.seed={seed}", f"data.cache_dir={out.parent / 'cache'}", f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "shelltrain", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"shelltrain failed:\n{done.stderr[-3000:]}")
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    rates = [float(r["images_per_second"]) for r in rows[1:]]
    return {"wall": wall, "val_acc": float(rows[-1]["val_acc"]), "rate": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-py", type=Path, required=True, help="timm's train.py (pytorch-image-models)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = {
        "timm train.py": lambda root, out, seed: run_timm(args.train_py, root, out, seed),
        "shelltrain": lambda root, out, seed: run_shelltrain(root, out, seed, []),
        "shelltrain data.cache=memory": lambda root, out, seed: run_shelltrain(root, out, seed, ["data.cache=memory"]),
    }
    results: dict[str, list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        make_folder(root)
        for seed in range(args.rounds):  # in turns, so that the machine's drift touches every case alike
            for i, (case, run) in enumerate(cases.items()):
                result = run(root, Path(tmp) / f"run_{seed}_{i}", seed)
                results[case].append(result)
                print(case, seed, json.dumps(result), flush=True)
    timm_wall = statistics.median(r["wall"] for r in results["timm train.py"])
    print(f"\n{args.rounds} rounds, CPU, {len(os.sched_getaffinity(0))} cores; median wall time of the whole process")
    print("| case | wall s | vs timm | img/s after epoch 1 | val acc |\n|---|---|---|---|---|")
    for case, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        rate = f"{statistics.median(r['rate'] for r in runs):.0f}" if "rate" in runs[0] else "-"
        acc = statistics.mean(r["val_acc"] for r in runs)
        print(f"| {case} | {wall:.1f} | {timm_wall / wall:.2f}x | {rate} | {acc:.3f} |")


if __name__ == "__main__":
    main()
