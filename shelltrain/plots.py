"""PNG pictures of a run: training curves, the confusion matrix, the top-loss gallery and per-class chart, and plain
functions for the pruning, ensembling and sweep stages.

matplotlib is imported only when a picture is drawn, and only its object-oriented API is used
(`Figure` rendered by the Agg canvas): no display is needed, and pyplot's global state and backend
are never touched, so shelltrain used as a library leaves a notebook's plotting alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shelltrain import rundir

if TYPE_CHECKING:  # torch is not imported here: a sweep summary can draw without it
    import torch

MARKER_LIMIT = 30  # up to this many points per line get a marker (a single epoch still shows)
ANNOTATE_LIMIT = 20  # confusion matrices up to this many classes print the count in each cell
TICK_LIMIT = 40  # ... and up to this many name every class on the axes
GALLERY_COLUMNS = 4  # images per row of the top-loss gallery


def plot_curves(history: Sequence[dict[str, float]], path: Path, best_epoch: int | None = None) -> Path:
    """Loss and accuracy for train and val (and the EMA weights' val, trainer.ema), and the learning rate, per epoch
    (rows as in metrics.csv); a dotted line marks `best_epoch`."""
    fig, axes = _figure(1, 3, width=13.5, height=3.8, layout=None)
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.13, top=0.92, wspace=0.2)  # its labels are known: no engine
    epochs = [int(row["epoch"]) for row in history]
    marker = "o" if len(epochs) <= MARKER_LIMIT else None
    splits = [("train", "-"), ("val", "--")] + ([("ema_val", ":")] if "ema_val_acc" in history[0] else [])
    for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        for split, style in splits:
            values = [_number(row.get(f"{split}_{metric}")) for row in history]
            ax.plot(epochs, values, style, marker=marker, markersize=3, label=split)
        ax.set_title(title)
        ax.legend()
    if best_epoch:
        for ax in axes[:2]:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1)
        axes[1].annotate(
            f"best epoch {best_epoch}", (best_epoch, 0.03), xycoords=("data", "axes fraction"), fontsize=8, color="grey"
        )
    axes[2].plot(epochs, [_number(row.get("lr")) for row in history], marker=marker, markersize=3, color="tab:green")
    axes[2].set_title("Learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_confusion_matrix(
    confusion: torch.Tensor | Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "test"
) -> Path:
    """Counts per (true, predicted) class; the colour is the row's share, so rare classes read as clearly."""
    import numpy as np

    matrix = np.asarray(confusion, dtype=np.float64)
    n = matrix.shape[0]
    share = matrix / matrix.sum(1, keepdims=True).clip(min=1)
    total = matrix.sum().item()
    accuracy = matrix.diagonal().sum().item() / total if total else float("nan")
    side = min(max(4.5, 0.45 * n + 2.5), 12.0)
    fig, (ax,) = _figure(1, 1, width=side + 1.2, height=side)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= ANNOTATE_LIMIT:
        for i in range(n):
            for j in range(n):
                count = int(matrix[i, j].item())
                if count:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    if n <= TICK_LIMIT:
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({title}: {int(total)} images, accuracy {accuracy:.4f})")
    return _save(fig, path)


def plot_tradeoff(
    rows: Sequence[dict[str, Any]], path: Path, x: str = "sparsity", y: str = "test_acc", latency: str = "latency_ms"
) -> Path:
    """Pruning or quantization trade-off: `y` against `x` (sparsity, MACs, params...) and, when rows have
    `latency`, `y` against latency. Each row is one model (the baseline and each pruned step); an optional
    "label" key names its point."""
    with_latency = [row for row in rows if _number(row.get(latency)) is not None]
    fig, axes = _figure(1, 2 if with_latency else 1, width=11 if with_latency else 5.8, height=4.2)
    panels = [(axes[0], rows, x)] + ([(axes[1], with_latency, latency)] if with_latency else [])
    for ax, points, key in panels:
        xs = [_number(row.get(key)) for row in points]
        ys = [_number(row.get(y)) for row in points]
        ax.plot(xs, ys, "-o", markersize=5)
        for row, px, py in zip(points, xs, ys):
            if row.get("label") is not None and px is not None and py is not None:
                ax.annotate(str(row["label"]), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        _log_if_wide(ax, xs)  # a teacher ensemble and an int8 student differ by orders of magnitude
        ax.set_xlabel(key)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{y} vs {x}")
    if with_latency:
        axes[1].set_title(f"{y} vs {latency}")
    return _save(fig, path)


def plot_members(rows: Sequence[dict[str, Any]], path: Path, metric: str = "test_acc") -> Path:
    """One bar per ensemble member and one for the ensemble: rows of {"name": ..., metric: ...}; rows
    whose name starts with "ensemble" are drawn in another colour, with a line at the best member."""
    names = [str(row["name"]) for row in rows]
    values = [_number(row.get(metric)) for row in rows]
    is_ensemble = [name.lower().startswith("ensemble") for name in names]
    fig, (ax,) = _figure(1, 1, width=6.5, height=max(2.5, 0.4 * len(rows) + 1.5))
    colors = ["tab:orange" if e else "tab:blue" for e in is_ensemble]
    ax.barh(range(len(rows)), [v if v is not None else 0.0 for v in values], color=colors)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    members = [v for v, e in zip(values, is_ensemble) if not e and v is not None]
    if members:
        ax.axvline(max(members), color="grey", linestyle=":", linewidth=1, label="best member")
        ax.legend(loc="upper right")
    known = [v for v in values if v is not None]
    if known:  # zoom on the differences: they are usually a fraction of a percent
        low, high = min(known), max(known)
        margin = max((high - low) * 0.5, 0.005)
        left = low - margin
        ax.set_xlim(max(0.0, left) if low >= 0 else left, high + margin)
    for i, v in enumerate(values):
        if v is not None:
            ax.annotate(f"{v:.4f}", (v, i), textcoords="offset points", xytext=(3, -3), fontsize=8)
    ax.set_xlabel(metric)
    ax.set_title(f"Members vs ensemble ({metric})")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, params: Sequence[str], metric: str = "test_acc") -> Path:
    """`metric` against each swept parameter, one panel per parameter: every run is a dot, the mean per
    value a line. Rows are summary.csv rows (values may be strings); runs without the metric are skipped."""
    runs = [row for row in rows if _number(row.get(metric)) is not None]
    params = list(params) or ["job"]
    columns = min(len(params), 3)
    lines = math.ceil(len(params) / columns)
    fig, axes = _figure(lines, columns, width=4.8 * columns, height=3.8 * lines)
    for ax, param in zip(axes, params):
        values = [row.get(param) for row in runs]
        scores = [_number(row.get(metric)) for row in runs]
        numeric = all(_number(v) is not None for v in values) and bool(values)
        if numeric:
            xs = [_number(v) for v in values]
            order = sorted(set(xs))
            _log_if_wide(ax, xs)
        else:
            labels = list(dict.fromkeys(str(v) for v in values))
            position = {label: i for i, label in enumerate(labels)}
            xs = [position[str(v)] for v in values]
            order = list(range(len(labels)))
            ax.set_xticks(order, labels, rotation=30 if len(labels) > 4 else 0)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.plot(xs, scores, "o", alpha=0.6, label="run")
        means = [_mean(s for px, s in zip(xs, scores) if px == value) for value in order]
        # a line between numeric values; a bar-like tick per category (their order means nothing)
        ax.plot(order, means, "-" if numeric else "_", color="tab:red", markersize=24, label="mean")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    fig.suptitle(f"{metric} per swept parameter ({len(runs)} runs)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)  # never over a point
    return _save(fig, path)


def plot_lr_find(rows: Sequence[dict[str, float]], suggested: float | None, path: Path) -> Path:
    """task=lr_find: the loss (raw and smoothed) against the learning rate on a log axis, the suggestion (None: no
    good rate was found) marked."""
    fig, (ax,) = _figure(1, 1, 6, 4)
    lrs = [row["lr"] for row in rows]
    ax.plot(lrs, [row["loss"] for row in rows], alpha=0.3, label="loss")
    ax.plot(lrs, [row["smoothed"] for row in rows], label="smoothed loss")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested lr {suggested:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    return _save(fig, path)


def plot_top_losses(images: Sequence[Any], titles: Sequence[str], wrong: Sequence[bool], path: Path) -> Path:
    """The gallery of the tested images with the highest loss: H x W x C arrays in [0, 1] (C = 1: grey), each titled
    with its true and predicted class; red titles are mistakes, green ones right but unsure. One picture of all
    tiles (not an axes per image: a tenth of the drawing time), pixels shown as they are."""
    import numpy as np

    height, width = images[0].shape[:2]
    gap, head = max(1, min(height, width) // 4), height * 0.45  # between tiles; above each tile for its two-line title
    columns = min(GALLERY_COLUMNS, len(images))
    lines = math.ceil(len(images) / columns)
    canvas = np.ones((math.ceil(lines * (height + head) + gap), columns * (width + gap) + gap, 3))
    corners = [
        (round(r * (height + head) + head), gap + c * (width + gap))
        for r, c in (divmod(i, columns) for i in range(len(images)))
    ]
    for (y, x), image in zip(corners, images):
        canvas[y : y + height, x : x + width] = image  # grey broadcasts to the three channels
    fig = _plain_figure(2.1 * columns, (2.1 * columns) * canvas.shape[0] / canvas.shape[1] + 0.5)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.5 / fig.get_figheight()))
    ax.imshow(canvas, interpolation="nearest")
    for (y, x), title, mistake in zip(corners, titles, wrong):
        color = "tab:red" if mistake else "tab:green"
        ax.text(x + width / 2, y - 0.04 * height, title, ha="center", va="bottom", fontsize=9, color=color)
    ax.set_axis_off()
    fig.suptitle(f"Highest loss first ({len(images)} images): true / predicted (probability)", y=0.995, va="top")
    return _save(fig, path)


def plot_per_class(per_class: dict[str, dict[str, Any]], path: Path, title: str = "test") -> Path:
    """Precision and recall per class (metrics.per_class_metrics' rows) as paired bars, so a weak class stands out."""
    names = list(per_class)
    n = len(names)
    fig, (ax,) = _figure(1, 1, width=min(20.0, max(6.0, 0.5 * n + 2)), height=4.2)
    positions = range(n)
    for offset, metric, color in ((-0.2, "precision", "tab:blue"), (0.2, "recall", "tab:orange")):
        values = [_number(per_class[name][metric]) or 0.0 for name in names]
        ax.bar([p + offset for p in positions], values, width=0.4, label=metric, color=color)
    if n <= TICK_LIMIT:
        ax.set_xticks(list(positions), names, rotation=90 if n > 10 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("score")
    ax.set_title(f"Precision and recall per class ({title})")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False)  # never over a bar
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _log_if_wide(ax: Any, values: Sequence[float | None]) -> None:
    """A log x axis when the (positive) values span two orders of magnitude or more."""
    known = [v for v in values if v is not None]
    if known and min(known) > 0 and max(known) / min(known) >= 100:
        ax.set_xscale("log")


def _figure(
    rows: int, columns: int, width: float, height: float, layout: str | None = "constrained"
) -> tuple[Any, list[Any]]:
    """A figure of rows x columns axes; the constrained layout engine (about 90 ms a figure) makes room for labels
    whose length is not known in advance (class names)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    axes = fig.subplots(rows, columns, squeeze=False)
    return fig, [ax for line in axes for ax in line]


def _plain_figure(width: float, height: float) -> Any:
    """A figure without a layout engine, for pictures that place their own axes."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    rundir.write_atomic(buffer.getvalue(), Path(path))
    return Path(path)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
