"""`logger=wandb` (optional extra `shelltrain[wandb]`): one Weights & Biases run per shelltrain run.

The same mapping as MLflow's: config = the flattened composed config, metrics every epoch's with the epoch as
step, the summary's numbers in the run summary, summary.json, metrics.csv and plots saved with it. Its files go
to <run dir>/wandb/; `logger.wandb.mode=offline` needs no account (`wandb sync` uploads later). A sweep's jobs
share a group (the sweep directory's name); a run dir resumed continues its W&B run (the id is kept in the run
dir)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

from shelltrain.errors import UserError
from shelltrain.loggers import RunLogger, flatten
from shelltrain.mlflow_logger import sweep_dir
from shelltrain.rundir import METRICS_CSV, PLOTS, SUMMARY, WANDB_RUN_ID, write_text


class WandbLogger(RunLogger):
    """The run in W&B; its id in <run dir>/wandb_run_id so that resuming the run dir continues it."""

    def __init__(
        self,
        run_dir: Path,
        project: str = "shelltrain",
        entity: str | None = None,
        mode: str | None = None,
        run_name: str | None = None,
    ):
        try:
            import wandb
        except ImportError:
            raise UserError('logger=wandb needs wandb: pip install "shelltrain[wandb]"') from None
        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.options = {"project": project, "entity": entity, "mode": mode, "name": run_name or self.run_dir.name}
        self.run: Any = None

    def start(self, config: dict[str, Any]) -> None:
        kept = self.run_dir / WANDB_RUN_ID
        run_id = kept.read_text().strip() if kept.is_file() else uuid.uuid4().hex[:8]
        sweep = sweep_dir()
        self.run = self.wandb.init(
            **{k: v for k, v in self.options.items() if v is not None},
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            group=Path(sweep).name if sweep else None,
            config=flatten({k: v for k, v in config.items() if k != "hydra"}),
        )
        write_text(run_id + "\n", kept)

    def on_epoch_end(self, state: Any, row: dict[str, float], improved: bool) -> None:
        metrics = {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}
        self.run.log(metrics, step=int(row["epoch"]))

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(
            {
                k: v
                for k, v in summary.items()
                if isinstance(v, (int, float, str)) and not (isinstance(v, float) and not math.isfinite(v))
            }
        )
        for path in [self.run_dir / SUMMARY, self.run_dir / METRICS_CSV, *sorted((self.run_dir / PLOTS).glob("*"))]:
            if path.is_file():
                self.run.save(str(path), base_path=str(self.run_dir), policy="now")
        self.run.finish()

    def fail(self, status: str) -> None:
        """A non-zero exit code: W&B shows the run as failed; the status says why."""
        if self.run is None:  # it failed before start
            return
        self.run.summary["status"] = status
        self.run.finish(exit_code=1)
