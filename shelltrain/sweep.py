"""The end of a sweep: one table of all runs (summary.csv, the console table, sweep.png: shelltrain.sweep_table),
a verdict and the exit code.

Built from disk (each run dir's `.hydra/` and `summary.json`), never from in-memory results, so it
works the same under process-based launchers (joblib, submitit) and for sweeps that are long done.
Three ways in:
- the `SweepSummary` Hydra callback (registered in configs/train.yaml) at the end of a multirun;
- the CLI wrapper, when a failed job made Hydra skip `on_multirun_end` (see `finish`);
- `shelltrain-summary DIR` / `shelltrain summarize DIR` for any sweep or outputs folder.

No torch imports here: the callback is instantiated on every start of `shelltrain`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from shelltrain import rundir
from shelltrain.errors import UserError
from shelltrain.report_page import wanted_for_sweep, write_sweep_page
from shelltrain.sweep_stop import SweepStop
from shelltrain.sweep_table import JobRow, collect, plot, ranked, table, write_csv

# Exit codes shared with the CLI (documented in README "Using shelltrain in CI").
EXIT_GATE_FAILED = 3
EXIT_JOBS_FAILED = 4


@dataclass
class Outcome:
    rows: list[JobRow]
    csv_path: Path | None
    interrupted: int | None = None  # the signal that stopped a process-based sweep
    sweep_dir: Path | None = None

    @property
    def failed(self) -> list[JobRow]:
        return [r for r in self.rows if r.failed]

    @property
    def gates_failed(self) -> list[JobRow]:
        return [r for r in self.rows if not r.failed and r.gates_failed]

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_JOBS_FAILED
        return EXIT_GATE_FAILED if self.gates_failed else 0


def summarize(
    root: Path, console: Any = None, write: bool = True, out: Path | None = None, owned: bool = False
) -> Outcome:
    """Print the table of the runs under `root` and a verdict line; returns what was found. With `write`,
    summary.csv (and sweep.png and report.html beside it) goes to `out`, else into `root` when it is a sweep dir
    (Hydra's multirun.yaml there, or `owned`: the multirun of this process); never into a folder of other runs."""
    root = Path(root)
    console = console or make_console()
    rows = collect(root)
    if not rows:
        console.print(f"no runs found under {root} (a run dir holds .hydra/ and summary.json)")
        return Outcome(rows, None)
    sweep_dir = owned or (root / rundir.SWEEP_CONFIG).is_file()
    csv_path = Path(out) if out is not None else root / rundir.SWEEP_SUMMARY if sweep_dir else None
    if write and csv_path is not None:
        write_csv(rows, root, csv_path)
        if any(r.plots for r in rows) and any(r.score is not None for r in rows):
            plot(rows, csv_path.parent / rundir.SWEEP_PLOT)
        if wanted_for_sweep(root):  # after sweep.png: the page inlines it
            write_sweep_page(csv_path)
    else:
        csv_path = None
    console.print(table(rows, title=f"shelltrain sweep: {root}", root=root))
    console.print(_verdict(rows, csv_path, write and not sweep_dir and out is None, root), markup=False)
    best = ranked(rows)[0]
    if best.score is not None:
        label = f"job {best.job}" if best.job is not None else "run"
        console.print(
            f"best: {label} ({' '.join(best.overrides) or 'no overrides'}), best {best.monitor}"
            f"{' CV mean' if isinstance(best.summary.get('cv'), dict) else ''} {best.score:.4g}: {best.run_dir}",
            markup=False,
        )
    return Outcome(rows, csv_path)


def _verdict(rows: Sequence[JobRow], csv_path: Path | None, not_a_sweep: bool, root: Path) -> str:
    """The footer: how many runs completed, are running, failed or missed a gate, and where the table went."""
    done = len([r for r in rows if not r.failed and not r.running])
    parts = [f"{len(rows)} run{'s' if len(rows) != 1 else ''}: {done} completed"]
    running = len([r for r in rows if r.running])
    stopped = {status: len([r for r in rows if r.status == status]) for status in ("interrupted", "incomplete")}
    failed = len([r for r in rows if r.failed]) - sum(stopped.values())
    parts += [f"{running} running"] if running else []
    parts += [f"{count} {status}" for status, count in stopped.items() if count]
    parts += [f"{failed} failed"] if failed else []
    gated = [r for r in rows if not r.failed and r.gates_failed]
    parts += [f"{len(gated)} missed a quality gate"] if gated else []
    if csv_path is not None:
        return ", ".join(parts) + f"; table written to {csv_path}"
    if not_a_sweep:
        return ", ".join(parts) + f"; {root} is not a sweep dir: no summary.csv written there (--out FILE writes one)"
    return ", ".join(parts)


def make_console() -> Any:
    from rich.console import Console

    probe = Console()
    # A pipe (CI log) would get rich's 80 columns and wrap every cell; give wide tables room there.
    return Console(highlight=False, width=None if probe.is_terminal else 200)


# ---- the end of a multirun ---------------------------------------------------------------------------------------


class _SweepState:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.outcome: Outcome | None = None
        self.stop: Any = None  # sweep_stop.SweepStop of a process-based (joblib) sweep


_STATE = _SweepState()


class SweepSummary(Callback):
    """Hydra callback: note the sweep dir when a multirun starts, summarize it when the multirun ends.

    Hydra skips `on_multirun_end` when a job failed; the CLI then calls `finish()` itself, so the
    summary is written in every case. Under process launchers the jobs run elsewhere, but these two
    hooks run in the launching process, which is all this needs.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _STATE.dir = Path(str(config.hydra.sweep.dir)).absolute()
        _STATE.outcome = None
        if "joblib" in str(config.hydra.launcher.get("_target_", "")).lower():  # jobs in worker processes
            _STATE.stop = SweepStop(_STATE.dir)
            _STATE.stop.install()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _STATE.dir is None:  # registered by a user's config without on_multirun_start having run
            _STATE.dir = Path(str(config.hydra.sweep.dir)).absolute()
        _STATE.outcome = summarize(_STATE.dir, owned=True)


def finish() -> Outcome | None:
    """After a multirun returned or raised: the summary (written now if Hydra skipped the callback).

    Returns None outside a multirun (no sweep was started in this process).
    """
    if _STATE.dir is None:
        return None
    if _STATE.outcome is None:
        _STATE.outcome = summarize(_STATE.dir, owned=True)
    outcome = _STATE.outcome
    outcome.sweep_dir = _STATE.dir
    outcome.interrupted = _STATE.stop.signum if _STATE.stop is not None else None
    rundir.unlock(_STATE.dir)  # the sweep is over: the next command finds its directory free, not a dead holder's
    _STATE.dir = _STATE.outcome = _STATE.stop = None
    return outcome


def failure_line(outcome: Outcome) -> str:
    """One line for stderr naming what failed (exit code 4 or 3)."""
    where = f"see {outcome.csv_path}" if outcome.csv_path else ""
    if outcome.failed:
        first = outcome.failed[0]
        label = f"job {first.job}" if first.job is not None else str(first.run_dir)
        return (
            f"{len(outcome.failed)} of {len(outcome.rows)} sweep jobs failed "
            f"(first: {label}: {first.error or first.status}); {where}"
        )
    misses = outcome.gates_failed
    return f"{len(misses)} of {len(outcome.rows)} sweep jobs missed a quality gate; {where}"


# ---- shelltrain-summary ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`shelltrain-summary DIR`: the sweep table of a multirun dir (or of every run under an outputs dir)."""
    parser = argparse.ArgumentParser(
        prog="shelltrain-summary",
        description=(
            "Summarize runs: prints a table sorted by the monitored metric (the CV mean where cv.folds was set) "
            "and, for a sweep dir (multirun/DATE/TIME), writes DIR/summary.csv. DIR may also be a single run dir "
            "or any folder above runs (outputs/): their table goes only where --out says. Runs without "
            "summary.json written to in the last 10 minutes are 'running'. Exit code: 0 all completed (or "
            "running), 3 a run missed a quality gate, 4 a run failed or is incomplete."
        ),
    )
    parser.add_argument("dir", type=Path, help="sweep, run or outputs directory")
    parser.add_argument("--out", type=Path, help="write summary.csv (and sweep.png beside it) to this file")
    parser.add_argument("--no-write", action="store_true", help="only print the table, do not write summary.csv")
    args = parser.parse_args(argv)
    problem = None if args.dir.is_dir() else f"'{args.dir}' is not a directory"
    if args.out and (args.out.is_dir() or not args.out.parent.is_dir() or not os.access(args.out.parent, os.W_OK)):
        problem = f"--out '{args.out}' is not a file in a folder you can write; give one, e.g. --out table.csv"
    outcome = None
    try:
        outcome = summarize(args.dir, write=not args.no_write, out=args.out) if problem is None else None
    except UserError as exc:  # --out on a full disk or a place that refuses files
        problem = str(exc)
    if outcome is None:
        sys.stderr.write(f"shelltrain-summary: error: {problem}\n")
        return 2
    return outcome.exit_code if outcome.rows else 2


def console_main() -> None:
    sys.exit(main())


# ---- helpers -------------------------------------------------------------------------------------------------------
