"""Do data.balance's remedies help on a long-tailed digits? data.imbalance=10 keeps class k of digits' train split
at n * 10^(-k/9) images (class 0 the most, class 9 a tenth of it; val and test stay whole and balanced), then
model=cnn trains with data.balance=none, sampler and loss_weights over the same seeds.

Prints, per remedy, the mean recall of the 3 smallest classes (7, 8, 9) on the test split and the test accuracy,
mean ± std over the seeds.

    python benchmarks/imbalance.py [--seeds 3] [--epochs 5] [--factor 10]

Each run is the real pipeline in-process (`shelltrain.cli.run_in_dir`), run directories under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from pathlib import Path

COMMON = ["model=cnn", "trainer.device=cpu", "data.num_workers=0", "plots=false", "trainer.threads=1"]
REMEDIES = ("none", "sampler", "loss_weights")
SMALLEST = 3


def run(run_dir: Path, *overrides: str) -> dict:
    from shelltrain.cli import run_in_dir

    with contextlib.redirect_stdout(io.StringIO()):
        return run_in_dir(run_dir, *COMMON, *overrides)


def tail_recall(summary: dict) -> float:
    """Mean test recall of the last SMALLEST classes: the smallest in the long-tailed train split."""
    classes = list(summary["per_class"])
    return statistics.mean(summary["per_class"][name]["recall"] for name in classes[-SMALLEST:])


def experiment(out: Path, seeds: int, epochs: int, factor: float) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for remedy in REMEDIES:
        results[remedy] = {"tail_recall": [], "test_acc": []}
        for seed in range(seeds):
            overrides = [f"data.imbalance={factor}", f"data.balance={remedy}", f"trainer.epochs={epochs}"]
            summary = run(out / f"{remedy}_{seed}", *overrides, f"trainer.seed={seed}")
            results[remedy]["tail_recall"].append(tail_recall(summary))
            results[remedy]["test_acc"].append(summary["test_acc"])
    return results


def _ms(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = experiment(args.out or Path(tmp), args.seeds, args.epochs, args.factor)
    print(f"digits, data.imbalance={args.factor:g}, model=cnn, {args.epochs} epochs, {args.seeds} seeds")
    print(f"{'data.balance':<14} {'recall of the 3 smallest classes':<34} test_acc")
    for remedy, figures in results.items():
        print(f"{remedy:<14} {_ms(figures['tail_recall']):<34} {_ms(figures['test_acc'])}")


if __name__ == "__main__":
    main()
