"""shelltrain against timm's train.py on the same image-folder work, like for like, whole processes in turns.

The work: scikit-learn's digits as PNG files, 1,437 train, 360 val and the same 360 as test/ (so shelltrain carves
nothing out of train/), 32x32 RGB; resnet18 (ImageNet stem), SGD momentum 0.9 at lr 0.05 with a per-epoch cosine
schedule and no warm-up; timm's defaults for the rest (weight decay 2e-5, none on norms and biases, label smoothing
0.1, the last incomplete train batch dropped); batch 64, no augmentation, channels_last, 2 loader workers, 4 epochs,
CPU, a checkpoint every epoch. Cases, in turns round by round: timm's train.py, shelltrain with its defaults,
shelltrain with data.cache=memory.

Printed per case, beside the median wall time of the whole process (imports, data set-up, training, every
validation, checkpoints; shelltrain also tests once at the end and writes its report) and its spread (min-max),
the work each process did, read from what it wrote: train images per epoch, validation passes and images, test
passes and images, and the bytes it wrote to disk (the kernel's count for the process, checkpoints included).
The ratio column is timm's wall time over the case's, round by round: the median and the min-max.

    python benchmarks/vs_timm.py --train-py PATH/TO/pytorch-image-models/train.py [--rounds 3]
    python benchmarks/vs_timm.py --train-py ... --model resnet50 --size 64 --epochs 2   # a model-bound case

timm's train.py is not in the timm package: pass the file from a checkout of the installed timm's version.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bytecode import cache_bytecode_as_users_do

BATCH = 64


def make_folder(root: Path) -> None:
    """root/train/<digit>/*.png (1,437 digits), root/val/ (the 360 others) and root/test/ (a copy of val/), 32x32
    RGB: both tools train on the same 1,437 images and validate on the same 360."""
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
    shutil.copytree(root / "val", root / "test")


def measured(args: list[str], out: Path) -> tuple[float, float, int, str]:
    """Run a whole process: (wall seconds, CPU seconds and bytes written to disk by it and its waited-for children
    (loader workers), its output)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, cwd=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[1]} failed:\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_oublock * 512, text


def run_timm(train_py: Path, root: Path, out: Path, seed: int, work: argparse.Namespace) -> dict:
    args = [
        sys.executable, str(train_py), "--data-dir", str(root), "--train-split", "train", "--val-split", "val",
        "--model", work.model, "--num-classes", "10", "--input-size", "3", str(work.size), str(work.size),
        "--crop-pct", "1.0", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
        "--batch-size", str(BATCH), "--opt", "momentum", "--lr", "0.05", "--sched", "cosine", "--warmup-epochs", "0",
        "--epochs", str(work.epochs), "--no-aug", "--channels-last", "--workers", "2", "--device", "cpu",
        "--no-prefetcher", "--seed", str(seed), "--output", str(out), "--experiment", "run", "--log-interval", "1000",
    ]  # fmt: skip
    wall, cpu, written, text = measured(args, out)
    rows = list(csv.DictReader((out / "run" / "summary.csv").read_text().splitlines()))
    updates = [int(n) for n in re.findall(r"Train: \d+ \[\s*\d+/(\d+) ", text)]
    last_batches = re.findall(r"Test: \[\s*(\d+)/(\d+)\]", text)  # each validation logs its last batch
    return {
        "wall": wall,
        "cpu": cpu,
        "val_acc": float(rows[-1]["eval_top1"]) / 100,
        "train_images": updates[-1] * BATCH,  # timm drops the last incomplete batch: every batch is full
        "val_passes": sum(1 for i, n in last_batches if i == n),
        "val_images": _count_images(root / "val"),
        "test_passes": 0,
        "test_images": 0,
        "written": written,
    }


def shelltrain_args(root: Path, out: Path, seed: int, work: argparse.Namespace, extra: list[str]) -> list[str]:
    """The command that trains shelltrain on the work timm's train.py is given (timm's defaults spelled out)."""
    return [
        sys.executable, "-m", "shelltrain",
        "data=imagefolder", f"data.root={root}", f"data.image_size={work.size}", "data.mean=[0.5]", "data.std=[0.25]",
        f"data.batch_size={BATCH}", "data.num_workers=2", "data.drop_last=true", "augmentation=none",
        f"model={work.model}", "model.small_input=false", "optimizer=momentum", "optimizer.lr=0.05",
        "optimizer.weight_decay=2e-5", "optimizer.no_decay_norm_bias=true", "scheduler=cosine",
        "trainer.label_smoothing=0.1", f"trainer.epochs={work.epochs}", "trainer.device=cpu", "plots=false",
        f"trainer.seed={seed}", f"data.cache_dir={out.parent / 'cache'}", f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip


def run_shelltrain(root: Path, out: Path, seed: int, work: argparse.Namespace, extra: list[str]) -> dict:
    wall, cpu, written, _ = measured(shelltrain_args(root, out, seed, work, extra), out)
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    rates = [float(r["images_per_second"]) for r in rows[1:]]
    tested = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall": wall,
        "cpu": cpu,
        "val_acc": float(rows[-1]["val_acc"]),
        "rate": statistics.median(rates) if rates else float("nan"),
        "train_images": round(float(rows[-1]["images_per_second"]) * float(rows[-1]["seconds"])),
        "val_passes": sum(1 for r in rows if r.get("val_acc")),
        "val_images": _count_images(root / "val"),
        "test_passes": 1 if "test_acc" in summary else 0,
        "test_images": len(tested),
        "written": written,
    }


def _count_images(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-py", type=Path, required=True, help="timm's train.py (pytorch-image-models)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="resnet18", help="a torchvision/timm name both know: resnet18, resnet50")
    parser.add_argument("--size", type=int, default=32, help="input side in px (the 32 px digits are resized)")
    parser.add_argument("--epochs", type=int, default=4)
    work = parser.parse_args()
    cache_bytecode_as_users_do()
    cases = {
        "timm train.py": lambda root, out, seed: run_timm(work.train_py, root, out, seed, work),
        "shelltrain": lambda root, out, seed: run_shelltrain(root, out, seed, work, []),
        "shelltrain data.cache=memory": lambda root, out, seed: run_shelltrain(
            root, out, seed, work, ["data.cache=memory"]
        ),
    }
    results: dict[str, list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        make_folder(root)
        for seed in range(work.rounds):  # in turns, so that the machine's drift touches every case alike
            order = list(cases.items())
            for i, (case, run) in enumerate(order if seed % 2 == 0 else order[::-1]):  # alternate who goes first
                result = run(root, Path(tmp) / f"run_{seed}_{i}", seed)
                results[case].append(result)
                print(case, seed, json.dumps(result), flush=True)
    report(results, work)


def report(results: dict[str, list[dict]], work: argparse.Namespace) -> None:
    """The table: median wall time and spread, the ratio to timm round by round, the CPU time (which other load on
    the machine disturbs less than wall time), and the work each case did."""
    timm = results["timm train.py"]
    cores = len(os.sched_getaffinity(0))
    print(
        f"\n{work.model} at {work.size} px, {work.epochs} epochs, batch {BATCH}; {work.rounds} rounds in turns, CPU, "
        f"{cores} cores; whole process: median (min-max); vs timm: timm's time over the case's, round by round"
    )
    print(
        "| case | wall s | vs timm | CPU s | vs timm (CPU) | img/s after epoch 1 | train img/epoch | val passes x img "
        "| test passes x img | MB written | val acc |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for case, runs in results.items():
        rate = f"{statistics.median(r['rate'] for r in runs):.0f}" if "rate" in runs[0] else "-"
        first = runs[0]
        written = statistics.median(r["written"] for r in runs) / 1e6
        acc = statistics.mean(r["val_acc"] for r in runs)
        print(
            f"| {case} | {_spread([r['wall'] for r in runs])} | {_ratios(timm, runs, 'wall')} "
            f"| {_spread([r['cpu'] for r in runs])} | {_ratios(timm, runs, 'cpu')} | {rate} "
            f"| {first['train_images']} | {first['val_passes']} x {first['val_images']} "
            f"| {first['test_passes']} x {first['test_images']} | {written:.0f} | {acc:.3f} |"
        )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def _ratios(timm: list[dict], runs: list[dict], key: str) -> str:
    """timm's figure over the case's in each round (the machine's drift cancels): median (min-max)."""
    ratios = [t[key] / r[key] for t, r in zip(timm, runs)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


if __name__ == "__main__":
    main()
