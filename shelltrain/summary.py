"""summary.json, the one record every job leaves in its run directory; this module is its only writer.

The contract (docs/architecture.md): `status` first (completed | failed | interrupted), then the headline figures
as flat keys (`test_acc`, `best_val_acc`, `params`, ...), `wall_seconds` and where the figures were made
(`device`, versions, `run_dir`), then one nested section per stage that ran (`per_class`, `transfer`, `prune`,
`ensemble`, `cv`, ...). `build` assembles a finished job's; `record` marks a run that failed or was stopped,
keeping whatever figures it had already written. No torch here: the CLI records failures without loading it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from shelltrain import job_records, rundir
from shelltrain.errors import UserError

log = logging.getLogger("shelltrain")


def build(
    figures: dict[str, Any],
    run_dir: Path,
    started: float | None = None,
    provenance: dict[str, Any] | None = None,
    status: str = "completed",
) -> dict[str, Any]:
    """A finished job's summary: `figures` (flat values first, dict values as sections after), the seconds since
    `started` (time.perf_counter), and `provenance` (environment.provenance: device, versions, run_dir)."""
    summary: dict[str, Any] = {"status": status}
    summary.update({key: value for key, value in figures.items() if not isinstance(value, dict)})
    if started is not None:
        summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    summary.update(provenance or {"run_dir": str(run_dir)})
    summary.update({key: value for key, value in figures.items() if isinstance(value, dict)})
    return summary


def write(summary: dict[str, Any], run_dir: Path) -> None:
    """summary.json, written atomically."""
    rundir.write_json(summary, rundir.summary(run_dir))


def read(run_dir: Path) -> dict[str, Any]:
    """A job's summary.json ({} when there is none yet, or it is unreadable: a job killed while writing it)."""
    path = rundir.summary(run_dir)
    try:
        return rundir.read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def record(run_dir: Path, status: str, keep: bool = True, **fields: Any) -> None:
    """Mark a job failed or interrupted in its summary.json, keeping the figures it already wrote (`keep`; the
    runner, which knows where training stopped, writes its fields alone). Used while a failure is already being
    reported, so a run directory that cannot be written only loses this note."""
    if job_records.borrowed(run_dir):  # a resumed sweep's job in a numbered directory that holds another run
        log.warning("%s job not recorded in %s: it holds another job's run", status, run_dir)
        return
    summary = read(run_dir) if keep else {}
    summary.update(status=status, **fields)
    summary.setdefault("run_dir", str(run_dir))
    try:
        write(summary, run_dir)
    except UserError as exc:  # the failure itself is what the user must see
        log.warning("could not record the %s job in %s: %s", status, run_dir, exc)
