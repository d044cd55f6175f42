"""Where a run's metrics go: the `logger` config group, one entry per logger, any number at once.

Each logger is an engine Callback (`on_epoch_end` gets every epoch's metrics) with more hooks the runner calls:
`start(config)` before training, `finish(summary)` with summary.json at the end, or `fail(status)` when the run
was interrupted or failed.
Packaged: csv (metrics.csv, written by `MetricsCSV`), jsonl (metrics.jsonl) and tensorboard. A user's own logger
is a config entry with a `_target_` naming a class that takes `run_dir` and the entry's other keys.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from shelltrain.console import figure
from shelltrain.engine import Callback, Callbacks, TrainState
from shelltrain.errors import UserError
from shelltrain.rundir import METRICS_CSV, METRICS_JSONL, TENSORBOARD, write_text

log = logging.getLogger("shelltrain")

# Per-epoch TensorBoard tags: train/val pairs share a chart section ("loss", "acc").
TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "acc/train",
    "val_acc": "acc/val",
    "lr": "lr",
    "images_per_second": "speed/images_per_second",
    "seconds": "speed/epoch_seconds",
}


class RunLogger(Callback):
    """A Callback that also sees the run's config at the start and its summary at the end."""

    def start(self, config: dict[str, Any]) -> None: ...

    def resume(self, history: list[dict[str, float]]) -> None:
        """A resumed run: make what was logged agree with the checkpoint's `history` (one row per epoch)."""

    def finish(self, summary: dict[str, Any]) -> None: ...

    def fail(self, status: str) -> None:
        """The run ended without a summary (`status`: "interrupted" or "failed"): say so where the logger keeps
        the run's state, and close what `start` opened."""


class Loggers(Callbacks):
    """All configured loggers as one callback; as a context manager, a run that raises ends them with `fail`
    (an MLflow or W&B run would otherwise stay "running" forever)."""

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if error is None:
            return
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"  # Interrupted: a signal
        for logger in self.callbacks:
            try:
                logger.fail(status)
            except Exception as exc:  # the run's own error is the one to report; this one only warns
                log.warning("logger %s could not record the %s run: %s", type(logger).__name__, status, exc)

    def start(self, config: dict[str, Any]) -> None:
        for logger in self.callbacks:
            logger.start(config)

    def resume(self, history: list[dict[str, float]]) -> None:
        for logger in self.callbacks:
            logger.resume(history)

    def finish(self, summary: dict[str, Any]) -> None:
        for logger in self.callbacks:
            logger.finish(summary)


def build_loggers(loggers: DictConfig | None, run_dir: Path) -> Loggers:
    """One logger per entry of the `logger` config (none for `logger=[]`)."""
    from hydra.utils import get_class

    built = []
    for name, options in (loggers or {}).items():  # names were checked by schema.validate
        options = dict(OmegaConf.to_container(options, resolve=True) or {})
        target = options.pop("_target_", None)
        cls = get_class(target) if target else PACKAGED[name]
        built.append(cls(run_dir, **options))
    return Loggers(built)


METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "images_per_second",
]
EMA_COLUMNS = ["ema_val_loss", "ema_val_acc"]  # after val_acc, in runs with trainer.ema
# after val_acc, in multi-label runs (trainer.loss=bce)
MULTI_LABEL_COLUMNS = ["val_map", "val_f1_micro", "val_f1_macro", "val_precision", "val_recall"]


def metric_columns(row: dict[str, float]) -> list[str]:
    """metrics.csv's columns: the fixed ones, and the val figures a run measures besides them (the EMA weights'
    with trainer.ema, mAP and F1 in a multi-label run)."""
    extra = [*(EMA_COLUMNS if all(key in row for key in EMA_COLUMNS) else [])]
    extra += MULTI_LABEL_COLUMNS if "val_map" in row else []
    at = METRIC_COLUMNS.index("val_acc") + 1
    return [*METRIC_COLUMNS[:at], *extra, *METRIC_COLUMNS[at:]]


class MetricsCSV:
    """metrics.csv, one row per epoch; appending keeps earlier rows and writes the header once."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, row: dict[str, float]) -> None:
        """The file with `row` added, rewritten atomically (a full disk never leaves half a row)."""
        before = self.path.read_bytes().decode() if self.path.exists() else ""  # as written: \r\n line ends
        text = io.StringIO(newline="")
        columns = metric_columns(row)
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        if not before:
            writer.writeheader()
        writer.writerow({k: figure(row.get(k)) for k in columns})
        write_text(before + text.getvalue(), self.path)

    def sync(self, rows: list[dict[str, float]]) -> None:
        """Make the file hold exactly `rows` (a resumed checkpoint's history): a row written after that
        checkpoint is dropped (it will be recomputed), one missing from a crash is restored. A file that
        already matches is left as it is; otherwise it is replaced atomically."""
        try:
            with open(self.path, newline="") as f:
                present = [r.get("epoch") for r in csv.DictReader(f)]
        except FileNotFoundError:
            present = []
        if present == [figure(row.get("epoch")) for row in rows]:
            return
        text = io.StringIO(newline="")
        columns = metric_columns(rows[0] if rows else {})
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: figure(row.get(k)) for k in columns})
        write_text(text.getvalue(), self.path)


class CSVLogger(RunLogger):
    """metrics.csv: one row per epoch with a fixed set of columns."""

    def __init__(self, run_dir: Path, filename: str = METRICS_CSV):
        self.metrics = MetricsCSV(run_dir / filename)

    def resume(self, history: list[dict[str, float]]) -> None:
        self.metrics.sync(history)

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        self.metrics.append(row)


class JSONLLogger(RunLogger):
    """One JSON object per epoch, every metric the epoch produced, appended to a file."""

    def __init__(self, run_dir: Path, filename: str = METRICS_JSONL):
        self.path = run_dir / filename

    def resume(self, history: list[dict[str, float]]) -> None:
        """Rows written after the checkpoint are dropped (they will be logged again)."""
        write_text("".join(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n" for row in history), self.path)

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        before = self.path.read_text() if self.path.exists() else ""  # rewritten atomically, never half a line
        write_text(before + json.dumps({k: _finite(v) for k, v in row.items()}) + "\n", self.path)


class TensorBoardLogger(RunLogger):
    """Event files: per-epoch scalars, the config as text, and hyperparameters with the final metrics."""

    def __init__(self, run_dir: Path, dir: str = TENSORBOARD):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                'logger=tensorboard needs the tensorboard package: pip install "shelltrain[tensorboard]"'
            ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / dir))
        self.config: dict[str, Any] = {}

    def resume(self, history: list[dict[str, float]]) -> None:
        """Events logged after the checkpoint's last epoch are purged, so no epoch shows twice."""
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.writer.log_dir
        self.writer.close()
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=len(history) + 1)

    def start(self, config: dict[str, Any]) -> None:
        self.config = {k: v for k, v in config.items() if k != "hydra"}
        text = OmegaConf.to_yaml(OmegaConf.create(self.config))
        # TensorBoard renders text as Markdown: an indented block keeps the YAML as it is.
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))
        self.writer.flush()

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        epoch = int(row["epoch"])
        for key, tag in TENSORBOARD_TAGS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], epoch)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {
            f"summary/{k}": float(v)
            for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        experiment, session_start, session_end = hparams(flatten(self.config), metrics)
        for event in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(event)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, summary.get("epochs_completed") or 0)
        self.writer.close()

    def fail(self, status: str) -> None:
        self.writer.close()


PACKAGED: dict[str, type[RunLogger]] = {"csv": CSVLogger, "jsonl": JSONLLogger, "tensorboard": TensorBoardLogger}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to TensorBoard hparam values: numbers, strings and booleans as they are, anything else
    (None, lists) as text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _finite(value: Any) -> Any:
    """JSON has no NaN: a NaN metric (e.g. an empty split) becomes null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
