"""The training progress display, an engine callback: a rich bar per epoch on a terminal, one plain line per epoch
elsewhere (a pipe, CI logs). Every epoch's line is also written to the run's log."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shelltrain.console import say
from shelltrain.engine import Callback, TrainState


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
        ema = ""  # trainer.ema: the averaged weights' val figures beside the model's
        if "ema_val_acc" in row:
            ema = f"ema_val_loss {row['ema_val_loss']:.4f}  ema_val_acc {row['ema_val_acc']:.4f}  "
        say(
            self.console,
            f"{self.label}epoch {int(row['epoch'])}/{self.epochs}  train_loss {row['train_loss']:.4f}  "
            f"train_acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}  "
            f"{ema}lr {row['lr']:.3g}  {row['images_per_second']:,.0f} img/s  {row['seconds']:.1f}s{mark}",
        )
