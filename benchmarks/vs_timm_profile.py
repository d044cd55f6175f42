"""Where a shelltrain process spends its time on benchmarks/vs_timm.py's work: the whole process under cProfile,
its cumulative times folded into the stages of a run (start-up and imports, composition, data set-up and the
measured mean/std, model and first forward, training, per-epoch validation, checkpoints, final test, report).

    python benchmarks/vs_timm_profile.py [--measure-stats] [--model resnet18 --size 32 --epochs 4] [-- overrides]

--measure-stats leaves data.mean/data.std null (measured on the train split, a user's default) instead of the
benchmark's fixed 0.5/0.25. cProfile sees the main thread only: checkpoint bytes written by the background writer
thread count where the training thread waits for them (the next epoch's checkpoint, the end of training). cProfile
adds its own overhead to every Python call (the training loop's ops run in C++ and are barely touched): read the
stages as shares, and the wall time printed beside them as the profiled process's.
"""

from __future__ import annotations

import argparse
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vs_timm

# (stage, pstats function key suffix "file.py:function"): cumulative times, so nested stages are listed separately
STAGES = [
    ("composition, Hydra set-up (cli.main minus the job)", "cli.py:main"),
    ("the job (cli._task)", "cli.py:_task"),
    ("importing shelltrain.jobs (torch, torchvision, ...)", "jobs.py:<module>"),
    ("data set-up (folder scan, splits, loaders)", "runner.py:_build_data"),
    ("  of which mean/std measured", "transforms.py:normalization_stats"),
    ("model, optimizer, first forward (build minus data)", "runner.py:build"),
    ("training epochs (train_one_epoch)", "engine.py:train_one_epoch"),
    ("per-epoch validation (evaluate)", "engine.py:evaluate"),
    ("checkpoints, training thread (Checkpointer.on_epoch_end)", "checkpoint.py:on_epoch_end"),
    ("  of which the non-finite check", "checkpoint.py:_refuse_non_finite"),
    ("  of which serializing", "checkpoint.py:serialize"),
    ("  of which waiting for the writer thread", "checkpoint_writer.py:wait"),
    ("final test (predictions, error analysis)", "runner.py:test"),
    ("report (summary.json, model card, report.html, console)", "runner.py:report"),
]


def cumulative(stats: pstats.Stats, key: str) -> float:
    """The summed cumulative seconds of every function whose `file:name` ends with `key` (0 when never called)."""
    path, name = key.split(":")
    total = 0.0
    for (file, _, function), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if function == name and file.endswith(path):
            total += cum
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure-stats", action="store_true")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="more shelltrain overrides, e.g. data.cache=memory")
    work = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, out, profile = Path(tmp) / "digits", Path(tmp) / "run", Path(tmp) / "profile.out"
        vs_timm.make_folder(root)
        args = vs_timm.shelltrain_args(root, out, 0, work, work.overrides)
        if work.measure_stats:
            args = [a for a in args if not a.startswith(("data.mean=", "data.std="))]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), *args[1:]], check=True, cwd=tmp)
        wall = time.perf_counter() - start
        stats = pstats.Stats(str(profile))
    whole = stats.total_tt  # type: ignore[attr-defined]
    print(f"{work.model} at {work.size} px, {work.epochs} epochs; profiled process {wall:.1f} s wall\n")
    print("| stage | seconds | share |\n|---|---|---|")
    print(f"| start-up: interpreter and imports before cli.main | {whole - cumulative(stats, 'cli.py:main'):.2f} | |")
    rows = {label: cumulative(stats, key) for label, key in STAGES}
    rows[STAGES[0][0]] -= rows[STAGES[1][0]]
    rows[STAGES[5][0]] -= rows[STAGES[3][0]]
    for label, seconds in rows.items():
        print(f"| {label} | {seconds:.2f} | {seconds / whole:.1%} |")
    print(f"| whole process (profiled) | {whole:.2f} | 100% |")


if __name__ == "__main__":
    main()
