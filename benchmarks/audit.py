"""The planted-error experiment at full scale: all of digits (1,797 images, 70/10/20 % train/val/test) with 5% of
the train labels flipped at random and 20 test images copied into train (exact, JPEG q=75, resized to 29 px and
back), audited with task=audit's defaults. Per seed: planted copies found, false pairs, the label-error ranking's
precision and recall in the top 5% of the train split, the confident-learning flags' precision and recall, and the
wall time. Prints a markdown table and the mean +- std over seeds.

    python benchmarks/audit.py [--seeds 0,1,2] [--workdir DIR] [KEY=VALUE ...]

Extra KEY=VALUE arguments are Hydra overrides (e.g. audit.folds=3 trainer.epochs=5). Default model: the small cnn,
10 epochs per fold model, adam.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the planted data source
from planted_data import planted  # noqa: E402

from shelltrain.audit import run_audit  # noqa: E402

RECIPE = [
    "model=cnn",
    "optimizer=adam",
    "optimizer.lr=0.003",
    "scheduler=none",
    "trainer.epochs=10",
    "data.cache=memory",
]


def one_seed(seed: int, workdir: Path, overrides: list[str]) -> dict[str, float]:
    """Audit the planted data of `seed`; score what it found against the truth."""
    source = f"data.source={{_target_:planted_data.load,seed:{seed}}}"
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data.num_workers=0",
                source,
                *RECIPE,
                "report.per_job=line",
                f"trainer.seed={seed}",
                *overrides,
            ],
        )
    run_dir = workdir / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    run_audit(cfg, run_dir)
    seconds = time.perf_counter() - started
    report = json.loads((run_dir / "audit.json").read_text())
    _, _, truth = planted(seed=seed)
    copies = {(train, test) for train, test, _ in truth["copies"]}
    found = {(p["a"]["index"], p["b"]["index"]) for p in report["pairs"]}
    flipped = set(truth["flipped"])
    k = round(0.05 * len(report["ranked"]))
    top = set(report["ranked"][:k])
    flagged = {c["index"] for c in report["candidates"]}
    return {
        "seed": seed,
        "copies_found": len(copies & found),
        "false_pairs": len(found - copies),
        "top5_precision": len(top & flipped) / k,
        "top5_recall": len(top & flipped) / len(flipped),
        "flagged": len(flagged),
        "flag_precision": len(flagged & flipped) / max(1, len(flagged)),
        "flag_recall": len(flagged & flipped) / len(flipped),
        "seconds": seconds,
        "scan_seconds": report["seconds_scan"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", type=Path, default=None)
    args, overrides = parser.parse_known_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="audit_bench_"))
    rows = [one_seed(int(s), workdir, overrides) for s in args.seeds.split(",")]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    for column in ("top5_precision", "top5_recall", "flag_precision", "flag_recall", "seconds"):
        values = [row[column] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{column}: {statistics.mean(values):.3f} +- {spread:.3f}")


if __name__ == "__main__":
    main()
