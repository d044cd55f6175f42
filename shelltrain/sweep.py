"""One table of all runs: `summary.csv` and a rich table built from the files each job wrote.

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
import csv
import io
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from shelltrain import rundir
from shelltrain.errors import UserError
from shelltrain.signals import SweepStop

# Exit codes shared with the CLI (documented in README "Using shelltrain in CI").
EXIT_GATE_FAILED = 3
EXIT_JOBS_FAILED = 4

# A run dir without summary.json in which something changed this recently is taken for a job still running.
RUNNING_SECONDS = 600

# Headline keys of summary.json copied into the table (when any run has them), in this order.
METRICS = ["test_acc", "test_loss", "best_val_acc", "best_val_loss", "best_epoch", "epochs_completed", "params"]


@dataclass
class JobRow:
    """One run directory, as read back from disk."""

    run_dir: Path
    job: int | None
    overrides: list[str]
    status: str
    monitor: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    plots: bool = True  # the job's `plots` option

    @property
    def score(self) -> float | None:
        """The value sweeps select by: the CV mean where cross-validation ran, else the best monitored val metric."""
        cv = self.summary.get("cv")
        value = cv.get("mean") if isinstance(cv, dict) else self.summary.get(f"best_{self.monitor}")
        return _number(value)

    @property
    def failed(self) -> bool:
        return self.status not in ("completed", "running")

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def gates_failed(self) -> bool:
        gates = self.summary.get("gates")
        return isinstance(gates, dict) and gates.get("passed") is False


def find_runs(root: Path) -> list[Path]:
    """Run dirs under `root` (or `root` itself): every folder holding the `.hydra/` Hydra wrote for its job."""
    root = Path(root)
    if (root / rundir.HYDRA).is_dir():
        return [root]
    found = [p.parent for p in root.rglob(rundir.HYDRA) if p.is_dir() and ".submitit" not in p.parts]
    return sorted(found, key=lambda p: (str(p.parent), _job_sort_key(p.name)))


def read_run(run_dir: Path) -> JobRow:
    hydra_dir = run_dir / rundir.HYDRA
    overrides = _load_yaml_list(run_dir / rundir.OVERRIDES)
    job = None
    hydra_yaml = _load_yaml(hydra_dir / "hydra.yaml")
    if hydra_yaml is not None:
        job = OmegaConf.select(hydra_yaml, "hydra.job.num", default=None, throw_on_missing=False)
    if not isinstance(job, int):
        job = int(run_dir.name) if run_dir.name.isdigit() else None
    config = _load_yaml(hydra_dir / "config.yaml")
    monitor, plots = "val_acc", True
    if config is not None:
        monitor = str(OmegaConf.select(config, "trainer.monitor", default="val_acc", throw_on_missing=False))
        plots = OmegaConf.select(config, "plots", default=True, throw_on_missing=False) is not False
    summary: dict[str, Any] = {}
    status, error = "incomplete", "no summary.json: killed before it could record anything"
    if _recently_written(run_dir):
        status, error = "running", ""
    path = rundir.summary(run_dir)
    if path.is_file():
        try:
            summary = rundir.read_json(path)
            status, error = str(summary.get("status", "unknown")), str(summary.get("error") or "")
        except (OSError, ValueError) as exc:
            status, error = "unreadable", f"summary.json cannot be read ({exc})"
    return JobRow(run_dir, job, overrides, status, monitor, summary, error, plots)


def collect(root: Path) -> list[JobRow]:
    return [read_run(p) for p in find_runs(root)]


def swept_keys(rows: Sequence[JobRow]) -> list[str]:
    """Override keys whose values differ between runs (all of them for a single run), in first-seen order."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for key, value in _split_overrides(row.overrides).items():
            values.setdefault(key, set()).add(value)
    if len(rows) == 1:
        return list(values)
    return [k for k, v in values.items() if len(v) > 1 or any(k not in _split_overrides(r.overrides) for r in rows)]


def ranked(rows: Sequence[JobRow]) -> list[JobRow]:
    """Best first by score (max for accuracies, min for losses); runs without a score (failed) last, by job."""
    with_score = [r for r in rows if r.score is not None and not math.isnan(r.score)]
    without = [r for r in rows if r not in with_score]
    with_score.sort(key=lambda r: -r.score if _maximize(r.monitor) else r.score)  # type: ignore[operator]
    without.sort(key=lambda r: (r.job is None, r.job or 0, str(r.run_dir)))
    return with_score + without


def write_csv(rows: Sequence[JobRow], root: Path, path: Path) -> list[str]:
    """summary.csv, one row per run in job order; returns its columns."""
    keys = swept_keys(rows)
    ranks = {id(r): i + 1 for i, r in enumerate(ranked(rows)) if r.score is not None}
    has_cv = any(isinstance(r.summary.get("cv"), dict) for r in rows)
    has_gates = any(isinstance(r.summary.get("gates"), dict) for r in rows)
    columns = ["job", "run_dir", "overrides", *keys, "status", "rank", "monitor", "score", *METRICS]
    columns += ["cv_mean", "cv_std"] if has_cv else []
    columns += ["gates"] if has_gates else []
    columns += ["wall_seconds", "error"]
    ordered = sorted(rows, key=lambda r: (r.job is None, r.job or 0, str(r.run_dir)))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in ordered:
        split = _split_overrides(row.overrides)
        record: dict[str, Any] = {
            "job": "" if row.job is None else row.job,
            "run_dir": _relative(row.run_dir, root),
            "overrides": " ".join(row.overrides),
            **{k: split.get(k, "") for k in keys},
            "status": row.status,
            "rank": ranks.get(id(row), ""),
            "monitor": row.monitor,
            "score": _raw(row.score),
            **{m: _raw(row.summary.get(m)) for m in METRICS},
            "wall_seconds": _raw(row.summary.get("wall_seconds")),
            "error": row.error,
        }
        if has_cv:
            cv = row.summary.get("cv") if isinstance(row.summary.get("cv"), dict) else {}
            record.update(cv_mean=_raw(cv.get("mean")), cv_std=_raw(cv.get("std")))
        if has_gates:
            record["gates"] = _gates_text(row)
        writer.writerow(record)
    rundir.write_text(text.getvalue(), path)
    return columns


def plot(rows: Sequence[JobRow], path: Path) -> Path:
    """sweep.png beside summary.csv: test accuracy against each swept parameter (runs without one are left out)."""
    from shelltrain.plots import plot_sweep

    records = [{**_split_overrides(r.overrides), "test_acc": r.summary.get("test_acc")} for r in rows]
    return plot_sweep(records, path, swept_keys(rows), metric="test_acc")


def table(rows: Sequence[JobRow], title: str, root: Path) -> Any:
    from rich.table import Table
    from rich.text import Text

    keys = swept_keys(rows)
    has_cv = any(isinstance(r.summary.get("cv"), dict) for r in rows)
    has_gates = any(isinstance(r.summary.get("gates"), dict) for r in rows)
    monitors = sorted({r.monitor for r in rows})
    score_name = f"best {'/'.join(monitors)}" + (" (CV mean)" if has_cv else "")
    grid = Table(title=title, show_header=True, header_style="bold")
    grid.add_column("#", justify="right")
    grid.add_column("job", justify="right")
    grid.add_column("run dir", overflow="fold")
    for key in keys:
        grid.add_column(key, overflow="fold")
    grid.add_column("status")
    grid.add_column(score_name, justify="right")
    if has_cv:
        grid.add_column("CV std", justify="right")
    for metric in ("test_acc", "test_loss", "best_epoch"):
        grid.add_column(metric, justify="right")
    if has_gates:
        grid.add_column("gates", overflow="fold")
    grid.add_column("wall s", justify="right")
    grid.add_column("error", overflow="fold")
    for rank, row in enumerate(ranked(rows), start=1):
        split = _split_overrides(row.overrides)
        cells = [str(rank) if row.score is not None else "", "" if row.job is None else str(row.job)]
        cells.append(_relative(row.run_dir, root))
        cells += [_short(split.get(k, "")) for k in keys]
        cells += [row.status, _fmt(row.score, 4)]
        if has_cv:
            cv = row.summary.get("cv") if isinstance(row.summary.get("cv"), dict) else {}
            cells.append(_fmt(cv.get("std"), 4))
        cells += [_fmt(row.summary.get(m), 4) for m in ("test_acc", "test_loss", "best_epoch")]
        if has_gates:
            cells.append(_gates_text(row))
        cells += [_fmt(row.summary.get("wall_seconds"), 3), row.error]
        style = "red" if row.failed else "cyan" if row.running else "yellow" if row.gates_failed else None
        grid.add_row(*[Text(c) for c in cells], style=style)  # Text: overrides and errors are not markup
    return grid


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
    summary.csv (and sweep.png beside it) goes to `out`, else into `root` when it is a sweep dir (Hydra's
    multirun.yaml there, or `owned`: the multirun of this process); never into a folder of other runs."""
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
        if any(r.plots for r in rows) and any(_number(r.summary.get("test_acc")) is not None for r in rows):
            plot(rows, csv_path.parent / rundir.SWEEP_PLOT)
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


def _recently_written(run_dir: Path) -> bool:
    """Whether a file of `run_dir` (log, metrics, checkpoints) changed in the last RUNNING_SECONDS."""
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()), default=0.0)
    return time.time() - newest < RUNNING_SECONDS


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
        self.stop: Any = None  # signals.SweepStop of a process-based (joblib) sweep


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


def _split_overrides(overrides: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path) if path.is_file() else None
    except Exception:  # a half-written or hand-edited file: the row still shows, with what could be read
        return None


def _load_yaml_list(path: Path) -> list[str]:
    loaded = _load_yaml(path)
    if loaded is None:
        return []
    try:
        return [str(x) for x in OmegaConf.to_container(loaded)]  # type: ignore[union-attr]
    except Exception:
        return []


def _job_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _maximize(monitor: str) -> bool:
    return not monitor.endswith("loss")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _raw(value: Any) -> str:
    """Full precision for summary.csv (the table rounds)."""
    return "" if value is None else str(value)


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _short(value: str) -> str:
    """A long float from a search (0.022881136684755242) as 0.02288 in the table; summary.csv keeps it whole."""
    if len(value) <= 8:
        return value
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _gates_text(row: JobRow) -> str:
    gates = row.summary.get("gates")
    if not isinstance(gates, dict):
        return ""
    if gates.get("passed"):
        return "passed"
    return "missed: " + "; ".join(gates.get("failures", []))


def _relative(path: Path, root: Path) -> str:
    try:
        rel = Path(path).absolute().relative_to(Path(root).absolute())
        return "." if str(rel) == "." else str(rel)
    except ValueError:
        return str(path)
