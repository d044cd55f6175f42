"""A real transfer experiment on the bundled digits: does pretraining on some classes help learn others?

1. Pretrain model=cnn on digits 0-4 (all their images).
2. On digits 5-9 with a small labelled budget (data.samples_per_class train images per class; the val and test
   splits stay whole), train four ways with the same budget, epochs and seeds:
   fine-tune from the pretrained run vs from scratch, and linear_probe from the pretrained run vs from random
   weights. Prints the mean test accuracy of each over the seeds.

    python benchmarks/transfer.py [--budget 3] [--seeds 4] [--epochs 30] [--pretrain-epochs 8]

Each run is the real `shelltrain` pipeline in-process (`shelltrain.cli.run_in_dir`), with run directories under --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["model=cnn", "model.width=16", "data.image_size=16", "trainer.device=cpu", "data.num_workers=0"]
SOURCE = "data.classes=[0,1,2,3,4]"
TARGET = "data.classes=[5,6,7,8,9]"


def run(run_dir: Path, *overrides: str) -> dict:
    from shelltrain.cli import run_in_dir

    return run_in_dir(run_dir, *COMMON, *overrides)


def experiment(out: Path, budget: int, seeds: int, epochs: int, pretrain_epochs: int, quiet: bool = True) -> dict:
    """Test accuracies of the four arms per seed, and the pretrained run's own test accuracy."""
    started = time.perf_counter()
    source = out / "pretrain"
    pretrained = _quietly(quiet, run, source, SOURCE, f"trainer.epochs={pretrain_epochs}")
    target = [TARGET, f"data.samples_per_class={budget}", f"trainer.epochs={epochs}"]
    target += ["optimizer=adam", "optimizer.lr=0.003"]
    arms = {
        "finetune_pretrained": [f"model.weights={source}"],
        "finetune_scratch": [],
        "probe_pretrained": [f"model.weights={source}", "finetune=linear_probe", "optimizer.lr=0.01"],
        "probe_random": ["finetune=linear_probe", "optimizer.lr=0.01"],
    }
    results: dict = {"pretrain_test_acc": pretrained["test_acc"], "arms": {}}
    for name, extra in arms.items():
        accs = []
        for seed in range(seeds):
            summary = _quietly(quiet, run, out / f"{name}-{seed}", *target, *extra, f"trainer.seed={seed}")
            accs.append(summary["test_acc"])
        results["arms"][name] = accs
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _quietly(quiet: bool, func, *args):
    if not quiet:
        return func(*args)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return func(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=3, help="labelled train images per class of digits 5-9")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30, help="epochs on the budget (each is a few batches)")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="show every run's output")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="shelltrain-transfer-"))
    results = experiment(out, args.budget, args.seeds, args.epochs, args.pretrain_epochs, quiet=not args.verbose)
    print(f"pretrained on digits 0-4: test accuracy {results['pretrain_test_acc']:.3f}")
    print(f"digits 5-9, {args.budget} labelled train images per class, {args.epochs} epochs, {args.seeds} seeds:")
    for name, accs in results["arms"].items():
        per_seed = ", ".join(f"{a:.3f}" for a in accs)
        print(f"  {name:<22} test accuracy {statistics.mean(accs):.3f}  (per seed: {per_seed})")
    print(f"run directories: {out}  ({results['seconds']:.0f} s)")
    arms = {k: statistics.mean(v) for k, v in results["arms"].items()}
    ok = arms["finetune_pretrained"] > arms["finetune_scratch"] and arms["probe_pretrained"] > arms["probe_random"]
    print("pretraining helps: " + ("yes" if ok else "NO"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
