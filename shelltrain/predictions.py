"""What a model got wrong, image by image: predictions.csv (one row per tested image), the most-confused class
pairs, the top-loss gallery and the per-class precision/recall chart.

The one home of these files: a training run's test step and `task=evaluate` both call `error_analysis` with the
logits and targets they already measured, so nothing is predicted twice and both write the same columns.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch.utils.data import Dataset, Subset

from shelltrain import rundir
from shelltrain.cam import GALLERY_PLOT, Cam, draw, usable
from shelltrain.data import DataBundle, FileImages
from shelltrain.multilabel import SEPARATOR, decide, multi_hot
from shelltrain.painting import Painter
from shelltrain.plots import plot_per_class, plot_top_losses
from shelltrain.preprocess import Preprocessing

TOP_PAIRS = 5  # summary.json's confused_pairs: this many (true, predicted) pairs, most frequent first
GALLERY_SIZE = 16  # images in plots/top_losses.png
NAME_WIDTH = 12  # a class name longer than this is cut in the gallery's titles
COLUMNS = ("sample", "true", "predicted", "probability", "true_probability", "loss", "correct", "split")


def error_analysis(
    run_dir: Path,
    logits: torch.Tensor,
    targets: torch.Tensor,
    dataset: Dataset,
    data: DataBundle,
    split: str,
    per_class: dict[str, dict[str, Any]],
    painter: Painter | None,
    cam: Cam | None = None,
) -> list[dict[str, Any]]:
    """predictions.csv for `split` (`dataset`'s first rows, in the order the logits were measured), and with a
    `painter` (the config's `plots`) the top-loss gallery (with `cam`, also its Grad-CAM overlays) and the per-class
    chart; returns the most-confused pairs for summary.json."""
    logits, targets = logits.float().cpu(), targets.long().cpu()
    losses = F.cross_entropy(logits, targets, reduction="none")
    ids = sample_ids(dataset, len(targets))
    write_predictions(Path(run_dir) / rundir.PREDICTIONS, ids, logits, targets, losses, data.classes, split)
    if painter is not None and len(targets):
        top, batch, images, titles, wrong = gallery(logits, targets, losses, dataset, data)
        painter.draw(plot_top_losses, images, titles, wrong, Path(run_dir) / rundir.PLOTS / rundir.TOP_LOSSES_PLOT)
        if cam is not None and usable(cam):
            heat = draw(cam, batch.float(), images, logits[top].argmax(1).tolist())
            painter.draw(plot_top_losses, heat, titles, wrong, Path(run_dir) / rundir.PLOTS / GALLERY_PLOT)
        painter.draw(plot_per_class, per_class, Path(run_dir) / rundir.PLOTS / rundir.PER_CLASS_PLOT, split)
    return confused_pairs(logits.argmax(1), targets, data.classes)


def sample_ids(dataset: Dataset, count: int) -> list[str]:
    """Each tested sample's id: the image file's path for folder and manifest data (read from the files), else its
    index in the split (built-in sets, and folders decoded once by data.cache)."""
    index = list(range(count))
    if isinstance(dataset, Subset):
        index, dataset = [int(i) for i in dataset.indices[:count]], dataset.dataset
    if isinstance(dataset, FileImages):
        return [str(dataset.paths[i]) for i in index]
    return [str(i) for i in index]


def write_predictions(
    path: Path,
    ids: list[str],
    logits: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    classes: list[str],
    split: str,
) -> Path:
    """One row per sample: its id, true and predicted class, the probability of each, its cross-entropy loss,
    whether it was right, and the split."""
    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    true_probability = probabilities.gather(1, targets[:, None])[:, 0]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(COLUMNS)
    columns = (targets, predicted, confidence, true_probability, losses)
    for sample, true, guess, p, p_true, loss in zip(ids, *(c.tolist() for c in columns)):
        row = [classes[true], classes[guess], f"{p:.6f}", f"{p_true:.6f}", f"{loss:.6f}", int(true == guess), split]
        writer.writerow([sample, *row])
    rundir.write_text(text.getvalue(), path)
    return path


def confused_pairs(predicted: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """The (true, predicted) class pairs most often confused, most frequent first (ties in class order): at most
    TOP_PAIRS, mistakes only."""
    n = len(classes)
    counts = torch.bincount(targets * n + predicted, minlength=n * n).reshape(n, n)
    counts.fill_diagonal_(0)
    flat = counts.flatten()
    order = sorted(range(n * n), key=lambda k: (-int(flat[k]), k))[:TOP_PAIRS]
    return [
        {"true": str(classes[k // n]), "predicted": str(classes[k % n]), "count": int(flat[k])}
        for k in order
        if flat[k] > 0
    ]


def confused_table(pairs: list[dict[str, Any]], split: str = "test") -> Table:
    """summary.json's confused_pairs as the console shows them."""
    table = Table(title=f"most confused classes ({split})", show_header=True)
    for column, justify in (("true", "left"), ("predicted as", "left"), ("images", "right")):
        table.add_column(column, justify=justify)
    for pair in pairs:
        table.add_row(pair["true"], pair["predicted"], str(pair["count"]))
    return table


def gallery(
    logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, dataset: Dataset, data: DataBundle
) -> tuple[list[int], torch.Tensor, list[Any], list[str], list[bool]]:
    """The GALLERY_SIZE highest-loss images: their indices, the batch read back from the split (as the model took
    it, for Grad-CAM), the same un-normalized with the data's mean/std (H x W x C arrays in [0, 1]), their titles
    (true / predicted (probability)) and whether each is a mistake. Called with at least one tested image."""
    top = losses.topk(min(GALLERY_SIZE, len(losses))).indices.tolist()
    batch = torch.stack([dataset[i][0] for i in top])
    images = Preprocessing.of_data(data).pictures(batch)
    probabilities = logits.softmax(1)
    titles, wrong = [], []
    for i in top:
        true, guess = int(targets[i]), int(probabilities[i].argmax())
        said = f"pred {_short(data.classes[guess])} ({probabilities[i, guess]:.2f})"
        titles.append(f"true {_short(data.classes[true])}\n{said}")
        wrong.append(true != guess)
    return top, batch, images, titles, wrong


def _short(name: Any) -> str:
    name = str(name)
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"


LABEL_COLUMNS = ("sample", "true", "predicted", "scores", "exact", "split")  # multi-label predictions.csv


def write_label_predictions(
    path: Path,
    ids: list[str],
    logits: torch.Tensor,
    thresholds: list[float],
    classes: list[str],
    targets: torch.Tensor | None = None,
    split: str = "",
) -> Path:
    """Multi-label predictions.csv: per image its labels above their thresholds (`|`-joined) and each one's
    probability (`label:0.973|...`); with `targets` (a tested split) also the true labels, whether the two sets
    are equal, and the split. Without (task=predict): the columns file, labels, scores."""
    probabilities, chosen = decide(logits, thresholds)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(LABEL_COLUMNS if targets is not None else ("file", "labels", "scores"))
    truth = None if targets is None else multi_hot(targets, len(classes)).bool()
    for i, sample in enumerate(ids):
        picked = chosen[i].nonzero().flatten().tolist()
        labels = SEPARATOR.join(str(classes[k]) for k in picked)
        scores = SEPARATOR.join(f"{classes[k]}:{probabilities[i, k]:.6f}" for k in picked)
        if truth is None:
            writer.writerow([sample, labels, scores])
            continue
        true = SEPARATOR.join(str(classes[k]) for k in truth[i].nonzero().flatten().tolist())
        writer.writerow([sample, true, labels, scores, int(bool((truth[i] == chosen[i]).all())), split])
    rundir.write_text(text.getvalue(), path)
    return path
