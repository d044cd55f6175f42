"""What a run prints: its console, a line shown and logged at once, a finished job's headline figures, and how a
number is written in text (tables, metrics.csv).

Every line shown with `say`, and every table shown with `show`, is also written to the run's log, so train.log holds
what the console showed. A job's summary is a table, or with `report.per_job=line` one line.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

log = logging.getLogger("shelltrain")
_tag = ""  # "[job 3] " while this process runs one of a sweep's jobs beside others (tag_lines)

LINE_KEYS = ("task", "test_acc", "val_acc", "train_acc", "best_val_acc", "params", "wall_seconds")


def make_console(quiet: bool = False) -> Console:
    """The run's console; `quiet` (DDP ranks other than 0) prints nothing."""
    return Console(highlight=False, soft_wrap=True, quiet=quiet)


def tag_lines(tag: str) -> None:
    """Start every line this process shows with `tag` (e.g. "[job 3] "): jobs of a sweep that run at once print to
    one terminal, and each line must say whose it is. The run's own log needs no tag."""
    global _tag
    _tag = tag


def say(console: Console, message: str) -> None:
    """Print to the console and log the same line."""
    console.print(escape(_tag) + message)
    log.info(Text.from_markup(message).plain)


def show(console: Console, renderable: Any) -> None:
    """Print a table (any rich renderable) and log it as plain text."""
    if _tag:
        console.print(Text(_tag.rstrip()))
    console.print(renderable)
    if not console.quiet:
        text = Console(file=io.StringIO(), width=console.width, record=True, highlight=False, soft_wrap=True)
        text.print(renderable)
        log.info("\n%s", text.export_text().rstrip())


def figure(value: Any, digits: int = 6) -> str:
    """A value as text: floats to `digits` significant digits ("nan" for NaN), None as empty."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return "" if value is None else str(value)


def summary_table(summary: dict[str, Any]) -> Table:
    """summary.json's flat figures as a two-column table (nested sections are left to their own tables)."""
    table = Table(title="shelltrain summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if not isinstance(value, (dict, list)):
            table.add_row(key, figure(value))
    return table


def print_summary(console: Console, summary: dict[str, Any], per_job: str = "table") -> None:
    """A job's headline figures when it ends: its summary table, or with `report.per_job=line` one line (a sweep
    of many jobs stays readable)."""
    if per_job != "line":
        show(console, summary_table(summary))
        return
    figures = ", ".join(f"{key} {figure(summary[key])}" for key in LINE_KEYS if summary.get(key) is not None)
    show(console, Text(f"{summary.get('status', 'completed')}: {figures}"))
