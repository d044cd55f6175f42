"""Multi-label classification on a real multi-label set made offline: scikit-learn's bundled digits composited two
or three to an image.

Each 16x16 grey image holds two or three different digit classes, each a real 8x8 digit image in its own quadrant
of a 2x2 grid (the fourth quadrant stays dark when there are three, two stay dark when there are two); its labels
are those classes (`3|7|9`). The images are written as PNG files and listed in a manifest, then trained with the
real `shelltrain` pipeline in-process (`trainer.loss=bce`, `trainer.monitor=val_map`, thresholds tuned on val),
once per seed; the composite set is the same for every seed (--data-seed). Prints test mAP, micro/macro F1 per
seed and their median and spread (max - min).

    python benchmarks/multilabel.py [--images 1500] [--seeds 3] [--epochs 15]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COMMON = [
    "data=manifest",
    "data.image_size=16",
    "data.channels=1",
    "data.cache=memory",
    "data.batch_size=64",
    "model=cnn",
    "model.width=16",
    "trainer.loss=bce",
    "trainer.monitor=val_map",
    "optimizer=adam",
    "optimizer.lr=0.003",
    "scheduler=cosine",
    "trainer.device=cpu",
    "data.num_workers=0",
    "plots=false",
    "report.html=false",
]
FIGURES = ("test_map", "test_f1_micro", "test_f1_macro", "test_precision", "test_recall")


def composite_digits(folder: Path, count: int, seed: int) -> Path:
    """Write `count` composite images and labels.csv (path, label) under `folder`; returns the manifest."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    by_class = [np.flatnonzero(digits.target == k) for k in range(10)]
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        classes = rng.choice(10, size=int(rng.integers(2, 4)), replace=False)
        cells = rng.choice(4, size=len(classes), replace=False)
        canvas = np.zeros((16, 16), dtype=np.uint8)
        for k, cell in zip(classes, cells):
            y, x = divmod(int(cell), 2)
            canvas[8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = images[rng.choice(by_class[k])]
        Image.fromarray(canvas, mode="L").save(folder / "images" / f"{i}.png")
        rows.append({"path": f"images/{i}.png", "label": "|".join(str(k) for k in sorted(classes))})
    manifest = folder / "labels.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def experiment(out: Path, images: int, seeds: int, epochs: int, data_seed: int) -> dict:
    """Each seed's test figures on one composite set, and the wall time."""
    from shelltrain.cli import run_in_dir

    started = time.perf_counter()
    manifest = composite_digits(out / "data", images, data_seed)
    runs = []
    for seed in range(seeds):
        summary = run_in_dir(
            out / f"seed-{seed}",
            *COMMON,
            f"data.manifest={manifest}",
            f"data.cache_dir={out / 'cache'}",  # the decoded array stays with the run directories
            f"trainer.epochs={epochs}",
            f"trainer.seed={seed}",
        )
        runs.append({key: summary[key] for key in FIGURES})
    return {"runs": runs, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1500, help="composite images (train/val/test carved 70/10/20)")
    parser.add_argument("--seeds", type=int, default=3, help="trainer seeds, one run each")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--data-seed", type=int, default=0, help="which composite set is drawn")
    parser.add_argument("--out", type=Path, default=None, help="keep the data and run directories here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = experiment(args.out or Path(tmp), args.images, args.seeds, args.epochs, args.data_seed)
    print(f"composite digits, {args.images} images, 2-3 labels each, {args.epochs} epochs, {args.seeds} seeds:")
    for key in FIGURES:
        values = [run[key] for run in result["runs"]]
        shown = ", ".join(f"{v:.4f}" for v in values)
        spread = max(values) - min(values)
        print(f"  {key:15s} median {statistics.median(values):.4f}  spread {spread:.4f}  ({shown})")
    print(f"  wall time {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
