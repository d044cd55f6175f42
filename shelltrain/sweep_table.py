"""A sweep's jobs read back from disk: one row per run directory (its `.hydra/` and `summary.json`), ranked by the
monitored metric, as summary.csv, a rich table and sweep.png. No torch here (the Hydra callback imports it)."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from shelltrain import rundir
from shelltrain.console import figure

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
        return number(value)

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
    if isinstance(hydra_yaml, DictConfig):  # a hand-edited file may hold a list
        job = OmegaConf.select(hydra_yaml, "hydra.job.num", default=None, throw_on_missing=False)
    if not isinstance(job, int):
        job = int(run_dir.name) if run_dir.name.isdigit() else None
    config = _load_yaml(hydra_dir / "config.yaml")
    monitor, plots = "val_acc", True
    if isinstance(config, DictConfig):
        monitor = str(OmegaConf.select(config, "trainer.monitor", default="val_acc", throw_on_missing=False))
        plots = OmegaConf.select(config, "plots", default=True, throw_on_missing=False) is not False
    summary: dict[str, Any] = {}
    status, error = "incomplete", "no summary.json: killed before it could record anything"
    if _recently_written(run_dir):
        status, error = "running", ""
    path = rundir.summary(run_dir)
    if path.is_file():
        try:
            loaded = rundir.read_json(path)
            if not isinstance(loaded, dict):
                raise ValueError(f"a JSON {type(loaded).__name__}, not an object")
            summary = loaded
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
    """sweep.png beside summary.csv: the score the sweep ranks and selects by (best <monitor>, or its CV mean)
    against each swept parameter (runs without one are left out)."""
    from shelltrain.plots import plot_sweep

    cross_validated = any(isinstance(r.summary.get("cv"), dict) for r in rows)
    metric = f"best {rows[0].monitor}" + (" (CV mean)" if cross_validated else "")
    records = [{**_split_overrides(r.overrides), metric: r.score} for r in rows]
    return plot_sweep(records, path, swept_keys(rows), metric=metric)


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
        cells += [row.status, figure(row.score, 4)]
        if has_cv:
            cv = row.summary.get("cv") if isinstance(row.summary.get("cv"), dict) else {}
            cells.append(figure(cv.get("std"), 4))
        cells += [figure(row.summary.get(m), 4) for m in ("test_acc", "test_loss", "best_epoch")]
        if has_gates:
            cells.append(_gates_text(row))
        cells += [figure(row.summary.get("wall_seconds"), 3), row.error]
        style = "red" if row.failed else "cyan" if row.running else "yellow" if row.gates_failed else None
        grid.add_row(*[Text(c) for c in cells], style=style)  # Text: overrides and errors are not markup
    return grid


def _recently_written(run_dir: Path) -> bool:
    """Whether a file of `run_dir` (log, metrics, checkpoints) changed in the last RUNNING_SECONDS."""
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()), default=0.0)
    return time.time() - newest < RUNNING_SECONDS


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


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _raw(value: Any) -> str:
    """Full precision for summary.csv (the table rounds)."""
    return "" if value is None else str(value)


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
    failures = gates.get("failures") or []
    return "missed: " + "; ".join(str(f) for f in (failures if isinstance(failures, list) else [failures]))


def _relative(path: Path, root: Path) -> str:
    try:
        rel = Path(path).absolute().relative_to(Path(root).absolute())
        return "." if str(rel) == "." else str(rel)
    except ValueError:
        return str(path)
