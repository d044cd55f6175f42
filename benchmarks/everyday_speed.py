"""What a user waits for every day, as three ratios against plain references (whole processes, wall clock):

  help      `shelltrain --help` vs a bare Hydra app's `--help` (benchmarks/bare_hydra/app.py)    target <= 1.2
  start-up  from the command to the end of the first optimizer step: `shelltrain model=M` vs the plain loop
            (benchmarks/plain_loop.py), each stopped there by benchmarks/first_step.py
  whole     the default-style job from start to exit: `shelltrain model=M trainer.epochs=E` (its defaults: data
            digits, checkpoints, plots, report) vs the plain loop doing the same training             target <= 1.05

Both sides run with the same OpenMP wait policy: the one shelltrain picks when the benchmark starts (asleep on a
machine busier than its cores), or OMP_WAIT_POLICY as set. Each round runs every pair once, the two commands in
alternating order (round 1: reference first, round 2: shelltrain first, ...), so a machine that gets busier or
quieter weighs on both; the table shows each side's median and range and the median (range) of the per-round ratios.
Beside the wall-clock ratio the table gives the CPU ratio (user + system seconds of each command), which other
processes on a busy machine sway less.

    python benchmarks/everyday_speed.py --rounds 5                  # resnet18 on digits, 3 epochs
    python benchmarks/everyday_speed.py --rounds 3 --epochs 8       # the default job's 8 epochs
    python benchmarks/everyday_speed.py --epochs 1 --keep /tmp/es   # fixed costs weigh most; keep the run dirs
    python benchmarks/everyday_speed.py --only whole --extra plots=false   # what the plots cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bytecode import cache_bytecode_as_users_do

from shelltrain.cli import wait_passively_when_busy

HERE = Path(__file__).resolve().parent
TARGETS = {"help": 1.2, "start-up": None, "whole": 1.05}


def shelltrain_command() -> list[str]:
    """The installed `shelltrain` script next to this interpreter (what users type), else `python -m shelltrain`."""
    script = Path(sys.executable).with_name("shelltrain")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "shelltrain"]


Timing = tuple[float, float]  # (wall-clock seconds, CPU seconds of the process and its threads and children)


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wall(command: list[str], cwd: Path) -> Timing:
    """Seconds from starting `command` to its exit, and its CPU seconds; a failure stops the benchmark."""
    started, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, children_cpu() - cpu


def first_step(command: list[str], cwd: Path) -> Timing:
    """Seconds from starting `command` to the end of its first optimizer step (benchmarks/first_step.py), where
    it stops, and its CPU seconds until then."""
    cpu = children_cpu()
    env = {**os.environ, "EVERYDAY_T0": repr(time.time())}
    done = subprocess.run(
        [sys.executable, str(HERE / "first_step.py"), *command], cwd=cwd, capture_output=True, text=True, env=env
    )
    for line in done.stdout.splitlines():
        if line.startswith("FIRST_STEP "):
            return float(line.split()[1]), children_cpu() - cpu
    sys.exit(f"{' '.join(command)} reached no optimizer step:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def pairs(args: argparse.Namespace, work: Path) -> dict[str, tuple[Callable[[int], Timing], Callable[[int], Timing]]]:
    """Each measure's (shelltrain, reference) as functions of the round, each in a fresh output directory."""
    st = shelltrain_command()
    job = [f"model={args.model}", f"trainer.epochs={args.epochs}", *args.extra]
    plain = [str(HERE / "plain_loop.py"), f"--model={args.model}", f"--epochs={args.epochs}"]
    bare = [sys.executable, str(HERE / "bare_hydra" / "app.py"), "--help"]
    return {
        "help": (lambda r: wall([*st, "--help"], work), lambda r: wall(bare, work)),
        "start-up": (
            lambda r: first_step(["shelltrain", *job, f"hydra.run.dir={work}/first_{r}"], work),
            lambda r: first_step([*plain, f"--out={work}/plain_first_{r}"], work),
        ),
        "whole": (
            lambda r: wall([*st, *job, f"hydra.run.dir={work}/run_{r}"], work),
            lambda r: wall([sys.executable, *plain, f"--out={work}/plain_{r}"], work),
        ),
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, list[tuple[Timing, Timing]]]:
    """(shelltrain, reference) timings per round for each measure, the two sides in alternating order."""
    found: dict[str, list[tuple[Timing, Timing]]] = {name: [] for name in args.only}
    todo = pairs(args, work)
    for r in range(args.rounds):
        for name in args.only:
            ours, reference = todo[name]
            if r % 2 == 0:
                b = reference(r)
                a = ours(r)
            else:
                a = ours(r)
                b = reference(r)
            found[name].append((a, b))
            print(
                f"round {r + 1}/{args.rounds} {name:<8} shelltrain {a[0]:7.2f} s ({a[1]:.2f} CPU s)  "
                f"reference {b[0]:7.2f} s ({b[1]:.2f} CPU s)",
                flush=True,
            )
    return found


def machine() -> str:
    """The CPU model and the cores this process may use, for the record beside the figures."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {cores} cores"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


def report(found: dict[str, list[tuple[Timing, Timing]]], args: argparse.Namespace, load: tuple[str, str]) -> None:
    """Each side's median (range) wall seconds, the per-round wall ratio's median (range) against the target, and
    the CPU ratio (CPU seconds are less swayed by other processes on a busy machine than the wall clock)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"\n{machine()}; load average before {load[0]}, after {load[1]}; OMP_WAIT_POLICY {policy} on both sides")
    print(f"model={args.model} trainer.epochs={args.epochs} {' '.join(args.extra)}; {args.rounds} rounds, alternating")
    print(f"{'measure':<9} {'shelltrain s':>20} {'reference s':>20} {'ratio':>20}  {'CPU ratio':>20}  target")
    for name, rounds in found.items():
        ratios = [a[0] / b[0] for a, b in rounds]
        cpu = [a[1] / b[1] for a, b in rounds]
        target = TARGETS[name]
        verdict = "" if target is None else f"<= {target}  {'met' if statistics.median(ratios) <= target else 'MISSED'}"
        print(
            f"{name:<9} {spread([a[0] for a, _ in rounds]):>20} {spread([b[0] for _, b in rounds]):>20} "
            f"{spread(ratios):>20}  {spread(cpu):>20}  {verdict}".rstrip()
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="trainer.epochs of the job and the plain loop")
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--only", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--extra", nargs="*", default=[], help="further shelltrain overrides, e.g. plots=false")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder (default: deleted)")
    args = parser.parse_args()
    wait_passively_when_busy()  # as the shelltrain command would decide now, for the plain loop as well
    cache_bytecode_as_users_do()
    work = args.keep or Path(tempfile.mkdtemp(prefix="everyday_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        found = measure(args, work)
        if "whole" in found:
            accuracy(work, args.rounds)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    report(found, args, (before, " ".join(f"{x:.2f}" for x in os.getloadavg())))


def accuracy(work: Path, rounds: int) -> None:
    """The same work: both sides' test accuracy in the last round (close, not equal: shelltrain's loader and
    initialization draw their own random numbers)."""
    ours = json.loads((work / f"run_{rounds - 1}" / "summary.json").read_text())["test_acc"]
    plain = json.loads((work / f"plain_{rounds - 1}" / "result.json").read_text())["test_acc"]
    print(f"test accuracy in the last round: shelltrain {ours:.4f}, plain loop {plain:.4f}")


if __name__ == "__main__":
    main()
