"""What a run shows and leaves behind: the progress display, metrics.csv, summary.json's cv section and the tables.

A terminal gets a rich progress bar per epoch; a pipe (CI logs) gets one plain line per epoch.
Every line shown is also written to the run's log.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shelltrain.engine import Callback, TrainState
from shelltrain.rundir import fold_dir, write_text

log = logging.getLogger("shelltrain")

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


def make_console(quiet: bool = False) -> Console:
    """The run's console; `quiet` (DDP ranks other than 0) prints nothing."""
    return Console(highlight=False, soft_wrap=True, quiet=quiet)


def say(console: Console, message: str) -> None:
    """Print to the console and log the same line."""
    console.print(message)
    log.info(_plain(message))


def _plain(message: str) -> str:
    from rich.text import Text

    return Text.from_markup(message).plain


class MetricsCSV:
    """metrics.csv, one row per epoch; appending keeps earlier rows and writes the header once."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, row: dict[str, float]) -> None:
        """The file with `row` added, rewritten atomically (a full disk never leaves half a row)."""
        before = self.path.read_bytes().decode() if self.path.exists() else ""  # as written: \r\n line ends
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if not before:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
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
        if present == [_fmt(row.get("epoch")) for row in rows]:
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
        write_text(text.getvalue(), self.path)


class ConsoleProgress(Callback):
    """Per-epoch progress: a rich bar on a terminal, one plain line per epoch elsewhere."""

    def __init__(self, console: Console, epochs: int, label: str = ""):
        self.console = console
        self.epochs = epochs
        self.label = f"{label} " if label else ""
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None

    def on_epoch_start(self, epoch: int, num_batches: int) -> None:
        if not self.live:
            return
        self.progress = Progress(
            TextColumn(f"{self.label}epoch {epoch}/{self.epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=num_batches, stats="")

    def on_batch_end(self, batch: int, loss: float, acc: float, images_per_second: float) -> None:
        if self.progress is not None:
            stats = f"loss {loss:.4f} acc {acc:.4f} {images_per_second:,.0f} img/s"
            self.progress.update(self.task, completed=batch, stats=stats)

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        mark = " *" if improved else ""
        say(
            self.console,
            f"{self.label}epoch {int(row['epoch'])}/{self.epochs}  train_loss {row['train_loss']:.4f}  "
            f"train_acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}  "
            f"lr {row['lr']:.3g}  {row['images_per_second']:,.0f} img/s  {row['seconds']:.1f}s{mark}",
        )


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="shelltrain summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if not isinstance(value, (dict, list)):
            table.add_row(key, _fmt(value))
    return table


LINE_KEYS = ("task", "test_acc", "val_acc", "train_acc", "best_val_acc", "params", "wall_seconds")


def print_summary(console: Console, summary: dict[str, Any], per_job: str = "table") -> None:
    """A job's headline figures when it ends: its summary table, or with `report.per_job=line` one line (a sweep
    of many jobs stays readable)."""
    if per_job != "line":
        console.print(summary_table(summary))
        return
    figures = ", ".join(f"{key} {_fmt(summary[key])}" for key in LINE_KEYS if summary.get(key) is not None)
    console.print(f"{summary.get('status', 'completed')}: {figures}", markup=False)


def cv_section(fold_summaries: list[dict[str, Any]], monitor: str, refit: bool) -> dict[str, Any]:
    """summary.json's `cv` section: each fold's best monitored metric (on its held-out fold) and test accuracy,
    their mean and population std (numpy's default, as in scikit-learn's examples)."""
    folds = len(fold_summaries)
    scores = [float(s[f"best_{monitor}"]) for s in fold_summaries]
    tests = [float(s["test_acc"]) for s in fold_summaries]
    return {
        "folds": folds,
        "metric": f"best_{monitor}",
        "scores": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "test_acc": tests,
        "test_acc_mean": float(np.mean(tests)),
        "test_acc_std": float(np.std(tests)),
        "splitter": f"StratifiedKFold(n_splits={folds}, shuffle=True, random_state=data.split_seed)",
        "fold_dirs": [str(fold_dir(Path(), k)) for k in range(folds)],
        "refit": refit,
    }


def cv_table(section: dict[str, Any], monitor: str) -> Table:
    table = Table(title="cross-validation", show_header=True)
    table.add_column("fold", justify="right")
    table.add_column(f"best {monitor} (held-out fold)", justify="right")
    table.add_column("test_acc", justify="right")
    for k, (score, test) in enumerate(zip(section["scores"], section["test_acc"])):
        table.add_row(str(k), f"{score:.4f}", f"{test:.4f}")
    table.add_row(
        "mean ± std",
        f"{section['mean']:.4f} ± {section['std']:.4f}",
        f"{section['test_acc_mean']:.4f} ± {section['test_acc_std']:.4f}",
        style="bold",
    )
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)
