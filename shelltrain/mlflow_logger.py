"""`logger=mlflow` (optional extra `shelltrain[mlflow]`): one MLflow run per shelltrain run, through MlflowClient.

By default the tracking store is a local SQLite database, `sqlite:///<cwd>/outputs/mlflow.db`, with artifacts in
`outputs/mlartifacts/` beside it (no server); `logger.mlflow.tracking_uri` points at a team server instead. Params
are the flattened composed config, metrics every epoch's with the epoch as step, tags the run dir, git commit and
status; artifacts summary.json, metrics.csv and the plots. A job of a sweep is a child of one parent run per sweep
directory; a run resumed in place continues its MLflow run (the id is kept in the run dir).

Runs started at once may share one SQLite store: its creation (tables, migrations), the experiment and a sweep's
parent run are made under a file lock beside the database, and a call that finds the database locked by another
run's write is tried again. A store file that is not a database or cannot be written is one line before training."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shelltrain.errors import UserError
from shelltrain.loggers import RunLogger, flatten
from shelltrain.rundir import METRICS_CSV, MLFLOW_RUN_ID, PLOTS, SUMMARY, best_checkpoint, write_text

DEFAULT_ROOT = Path("outputs")  # the documented run root: outputs/mlflow.db and outputs/mlartifacts/
SWEEP_TAG = "shelltrain.sweep_dir"
KEY = "logger.mlflow.tracking_uri"
STORE_LOCK_SECONDS = 600  # how long a run waits for another to create the store (its migrations take seconds)
LOCKED_RETRIES = (0.2, 0.5, 1, 2, 4, 8)  # seconds between tries of a call that found the database locked


def default_tracking_uri() -> str:
    return f"sqlite:///{(DEFAULT_ROOT / 'mlflow.db').absolute()}"


class MLflowLogger(RunLogger):
    """The run in MLflow; its id in <run dir>/mlflow_run_id so that resuming the run dir continues it."""

    def __init__(
        self,
        run_dir: Path,
        tracking_uri: str | None = None,
        experiment: str = "shelltrain",
        run_name: str | None = None,
        log_checkpoint: bool = False,
    ):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError('logger=mlflow needs mlflow: pip install "shelltrain[mlflow]"') from None
        self.run_dir = Path(run_dir)
        self.uri = tracking_uri or default_tracking_uri()
        self.database = Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None
        if self.database is not None:
            check_sqlite_store(self.database)
        with self._store_lock():
            self.client = _Retrying(MlflowClient(tracking_uri=self.uri))  # creates the store's tables
            self.experiment_id = self._experiment(experiment)
        self.run_name = run_name
        self.log_checkpoint = log_checkpoint
        self.run_id: str | None = None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns of the cwd
            artifacts = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").absolute().as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Runs sharing a SQLite store take turns creating it and what they find-or-create in it (a server does
        that itself)."""
        from filelock import FileLock, Timeout

        if self.database is None:
            yield
            return
        lock = FileLock(str(self.database) + ".lock", timeout=STORE_LOCK_SECONDS)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(
                f"{KEY}: waited {STORE_LOCK_SECONDS} s for another run to create the MLflow store '{self.database}'; "
                f"if no run uses it, delete '{lock.lock_file}'"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def start(self, config: dict[str, Any]) -> None:
        """Continue the run dir's MLflow run (a resumed run) or create one, child of its sweep's parent."""
        from mlflow.entities import Param

        kept = self.run_dir / MLFLOW_RUN_ID
        if kept.is_file():
            self.run_id = kept.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "status", "resumed")
            return
        tags = {"run_dir": str(self.run_dir.absolute()), "status": "running", **_git_tags()}
        sweep = sweep_dir()
        if sweep is not None:
            with self._store_lock():  # parallel jobs of one sweep find or create one parent
                tags["mlflow.parentRunId"] = self._parent(sweep)
            tags[SWEEP_TAG] = sweep
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run_name or self.run_dir.name)
        self.run_id = run.info.run_id
        write_text(self.run_id + "\n", kept)
        params = [
            Param(k, str(v)[:6000]) for k, v in flatten({k: v for k, v in config.items() if k != "hydra"}).items()
        ]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[first : first + 100])

    def _parent(self, sweep_dir: str) -> str:
        """The sweep's parent run: found by its sweep directory tag, created by the first job."""
        query = f"tags.`{SWEEP_TAG}` = '{sweep_dir}' and tags.`shelltrain.parent` = 'true'"
        found = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        tags = {SWEEP_TAG: sweep_dir, "shelltrain.parent": "true", **_git_tags()}
        return self.client.create_run(self.experiment_id, tags=tags, run_name=Path(sweep_dir).name).info.run_id

    def on_epoch_end(self, state: Any, row: dict[str, float], improved: bool) -> None:
        from mlflow.entities import Metric

        step = int(row["epoch"])
        stamp = _now_ms()
        metrics = [
            Metric(key, float(value), stamp, step)
            for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value)
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any]) -> None:
        """Summary numbers as metrics, the status tag, the run's files as artifacts; the run ends FINISHED."""
        from mlflow.entities import Metric

        step, stamp = int(summary.get("epochs_completed") or 0), _now_ms()
        finals = [
            Metric(f"summary.{key}", float(value), stamp, step)
            for key, value in summary.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ]
        self.client.log_batch(self.run_id, metrics=finals)
        self.client.set_tag(self.run_id, "status", str(summary.get("status", "completed")))
        for name in (SUMMARY, METRICS_CSV):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / PLOTS).is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / PLOTS), artifact_path=PLOTS)
        best = best_checkpoint(self.run_dir)
        if self.log_checkpoint and best.is_file():
            self.client.log_artifact(self.run_id, str(best), artifact_path="checkpoints")
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, status: str) -> None:
        """An interrupted run ends KILLED (resuming the run dir sets it RUNNING again), a failed one FAILED."""
        if self.run_id is None:  # it failed before start
            return
        self.client.set_tag(self.run_id, "status", status)
        self.client.set_terminated(self.run_id, status="KILLED" if status == "interrupted" else "FAILED")


def check_sqlite_store(database: Path) -> None:
    """One line, before training, for a store file MLflow cannot use: not an SQLite database (MLflow would retry
    for about two minutes, then fail with a traceback) or not writable (the first write would fail)."""
    fix = f"point {KEY} at another file, or move this one away to start a new store"
    folder = database.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{KEY}: cannot create the folder of the MLflow store '{folder}' ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{KEY}: the folder of the MLflow store '{folder}' is read-only; {fix}")
    if not database.exists():
        return
    if not database.is_file():
        raise UserError(f"{KEY}: the MLflow store '{database}' is not a regular file; {fix}")
    if not os.access(database, os.W_OK):
        raise UserError(f"{KEY}: the MLflow store '{database}' is read-only; {fix}")
    try:
        with contextlib.closing(sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True)) as db:
            db.execute("select name from sqlite_master").fetchall()
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise UserError(
            f"{KEY}: the MLflow store '{database}' is not a readable SQLite database ({exc}); {fix}"
        ) from None


class _Retrying:
    """An MlflowClient whose calls are tried again while SQLite says another run's write holds the database."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def tried(*args: Any, **kwargs: Any) -> Any:
            for pause in LOCKED_RETRIES:
                try:
                    return method(*args, **kwargs)
                except Exception as exc:  # MLflow wraps SQLAlchemy's OperationalError in its own types
                    if "database is locked" not in str(exc):
                        raise
                time.sleep(pause)
            return method(*args, **kwargs)

        return tried


def sweep_dir() -> str | None:
    """The multirun's sweep directory when this job is one of a Hydra sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(Path(HydraConfig.get().sweep.dir).absolute())


def _git_tags() -> dict[str, str]:
    """The commit of the git checkout the command runs in, when there is one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:  # no git installed
        return {}
    return {"mlflow.source.git.commit": done.stdout.strip()} if done.returncode == 0 else {}


def _now_ms() -> int:
    return int(time.time() * 1000)
