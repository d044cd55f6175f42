"""Does distillation help on the bundled digits? A small student trained alone vs distilled from a larger teacher.

1. Train the teacher (model=cnn, width 32) on all of digits' train split.
2. For each label budget (data.samples_per_class train images per class; "all" = the whole train split; val and
   test stay whole), train the student (model=cnn, width 4) with the same epochs and seeds twice: alone (labels
   only) and distilled (distill=logits from the teacher, alpha 0.9, T 4). With a budget the student sees only
   those images: the teacher's soft outputs on them are the extra signal (the teacher was trained on all labels).
3. Print test accuracy mean ± std over the seeds, the seconds per epoch of each arm (`distilled` caches the
   teacher's logits, `uncached` runs the teacher on every batch: distill.cache=false), and optionally
   prune.distill vs plain fine-tuning after structured pruning.

    python benchmarks/distill.py [--seeds 3] [--epochs 10] [--budgets all,5] [--prune]

Each run is the real pipeline in-process (`shelltrain.cli.run_in_dir`), run directories under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import statistics
import tempfile
import time
from pathlib import Path

COMMON = ["model=cnn", "data.image_size=16", "trainer.device=cpu", "data.num_workers=0", "plots=false"]
COMMON += ["trainer.threads=1", "logger=[csv]"]
STUDENT = ["model.width=4"]


def run(run_dir: Path, *overrides: str) -> dict:
    from shelltrain.cli import run_in_dir

    with contextlib.redirect_stdout(io.StringIO()):
        return run_in_dir(run_dir, *COMMON, *overrides)


def epoch_seconds(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        return statistics.median(float(row["seconds"]) for row in csv.DictReader(f))


def experiment(out: Path, budgets: list[str], seeds: int, epochs: int, prune: bool, extra_prune: list[str]) -> dict:
    teacher_dir = out / "teacher"
    teacher = run(teacher_dir, "model.width=32", "trainer.epochs=10")
    distilled = ["distill=logits", f"distill.teacher={teacher_dir}"]
    # augmentation=none: `distilled` reads the teacher's logits from its cache after epoch 1 (distill.cache
    # unset); `uncached` calls the teacher on every batch: the same student, the teacher's cost per epoch
    arms = {"alone": [], "distilled": distilled, "uncached": [*distilled, "distill.cache=false"]}
    results: dict = {"teacher_test_acc": teacher["test_acc"], "rows": []}
    for budget in budgets:
        limit = [] if budget == "all" else [f"data.samples_per_class={budget}"]
        for arm, extra in arms.items():
            accs, seconds = [], []
            for seed in range(seeds):
                run_dir = out / f"{arm}-{budget}-{seed}"
                summary = run(run_dir, *STUDENT, *limit, *extra, f"trainer.epochs={epochs}", f"trainer.seed={seed}")
                accs.append(summary["test_acc"])
                seconds.append(epoch_seconds(run_dir))
            results["rows"].append({"budget": budget, "arm": arm, "accs": accs, "epoch_s": statistics.mean(seconds)})
    if prune:
        results["rows"] += prune_recovery(out, seeds, epochs, extra_prune)
    return results


RECOVERY = {  # how the pruned model is fine-tuned: the arms compared, on the same pruned model per seed
    "prune+finetune": ["prune.distill=false"],
    "prune+distill (T 1, alpha 0.5: the defaults)": ["prune.distill=true"],
    "prune+distill T 4, alpha 0.9": ["prune.distill=true", "prune.distill_temperature=4", "prune.distill_alpha=0.9"],
}


def prune_recovery(out: Path, seeds: int, epochs: int, extra_prune: list[str]) -> list[dict]:
    """Per seed one trained model (cnn width 16, `epochs` epochs), then for every arm of RECOVERY the same model
    loaded, pruned (structured, 3 of 4 channels removed) and fine-tuned for prune.finetune_epochs: the arms differ
    only in the recovery, so they are compared seed by seed."""
    accs: dict[str, list[float]] = {arm: [] for arm in RECOVERY}
    for seed in range(seeds):
        base = out / f"prune-base-{seed}"
        run(base, "model.width=16", f"trainer.epochs={epochs}", f"trainer.seed={seed}")
        for arm, extra in RECOVERY.items():
            pruned = [f"model.weights={base}", "trainer.epochs=0", "prune=structured", "prune.ratio=0.75", *extra_prune]
            summary = run(
                out / f"{arm}-{seed}".replace(" ", "_"), "model.width=16", f"trainer.seed={seed}", *pruned, *extra
            )
            accs[arm].append(summary["test_acc"])
    return [{"budget": "all", "arm": arm, "accs": accs[arm], "epoch_s": float("nan")} for arm in RECOVERY]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budgets", default="all,5", help="comma-separated samples_per_class values; all = every")
    parser.add_argument("--prune", action="store_true", help="also prune.distill vs plain fine-tuning (ratio 0.75)")
    parser.add_argument(
        "--prune-overrides", default="", help='more overrides of the pruning runs, e.g. "prune.ratio=0.5"'
    )
    parser.add_argument("--out", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="shelltrain-distill-"))
    started = time.perf_counter()
    budgets = [budget for budget in args.budgets.split(",") if budget]  # --budgets "" : only --prune
    results = experiment(out, budgets, args.seeds, args.epochs, args.prune, args.prune_overrides.split())
    print(f"teacher cnn width 32: test accuracy {results['teacher_test_acc']:.4f}")
    print(f"student cnn width 4, {args.epochs} epochs, {args.seeds} seeds (test accuracy mean ± std):")
    print("| train images per class | arm | test acc | per seed | s / epoch |")
    print("|---|---|---|---|---|")
    for row in results["rows"]:
        accs = row["accs"]
        spread = statistics.pstdev(accs)
        per_seed = ", ".join(f"{a:.3f}" for a in accs)
        print(
            f"| {row['budget']} | {row['arm']} | {statistics.mean(accs):.4f} ± {spread:.4f} | {per_seed} "
            f"| {row['epoch_s']:.3f} |"
        )
    print(f"run directories: {out}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
