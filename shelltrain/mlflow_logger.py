"""`logger=mlflow` (optional extra `shelltrain[mlflow]`): one MLflow run per shelltrain run, through MlflowClient.

By default the tracking store is a local SQLite database, `sqlite:///<cwd>/outputs/mlflow.db`, with artifacts in
`outputs/mlartifacts/` beside it (no server); `logger.mlflow.tracking_uri` points at a team server instead. Params
are the flattened composed config, metrics every epoch's with the epoch as step, tags the run dir, git commit and
status; artifacts summary.json, metrics.csv and the plots. A job of a sweep is a child of one parent run per sweep
directory; a run resumed in place continues its MLflow run (the id is kept in the run dir)."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any

from shelltrain.errors import UserError
from shelltrain.loggers import RunLogger, flatten
from shelltrain.rundir import METRICS_CSV, MLFLOW_RUN_ID, PLOTS, SUMMARY, best_checkpoint, write_text

DEFAULT_ROOT = Path("outputs")  # the documented run root: outputs/mlflow.db and outputs/mlartifacts/
SWEEP_TAG = "shelltrain.sweep_dir"


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
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
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
