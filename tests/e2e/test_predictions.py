"""Per-sample predictions and error analysis: predictions.csv, confused_pairs, the top-loss gallery and the per-class
chart, from a training run's test step and from task=evaluate."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import run_in_process
from fixtures_data import make_imagefolder
from PIL import Image

from shelltrain.predictions import COLUMNS, TOP_PAIRS

TINY = [
    "model=cnn",
    "model.width=8",
    "scheduler=none",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "trainer.epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
]


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def confusion_of(rows: list[dict[str, str]], classes: list[str]) -> torch.Tensor:
    position = {name: i for i, name in enumerate(classes)}
    matrix = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for row in rows:
        matrix[position[row["true"]], position[row["predicted"]]] += 1
    return matrix


def assert_rows_agree_with_summary(rows: list[dict[str, str]], summary: dict, split: str) -> None:
    """The csv's accuracy is the summary's to the bit, its losses average to the NLL, and its confusion matrix is the
    one per_class and confused_pairs were measured from."""
    correct = [int(row["correct"]) for row in rows]
    assert correct == [int(row["true"] == row["predicted"]) for row in rows]
    assert sum(correct) == round(summary[f"{split}_acc"] * len(rows))
    assert torch.tensor(correct, dtype=torch.float32).mean().item() == summary[f"{split}_acc"]  # same arithmetic
    mean_loss = sum(float(row["loss"]) for row in rows) / len(rows)
    assert mean_loss == pytest.approx(summary[f"{split}_nll"], abs=1e-5)
    assert all(float(row["probability"]) >= float(row["true_probability"]) - 1e-6 for row in rows)
    assert {row["split"] for row in rows} == {split}
    classes = list(summary["per_class"])
    matrix = confusion_of(rows, classes)
    for i, name in enumerate(classes):
        assert matrix[i].sum().item() == summary["per_class"][name]["support"]
        assert matrix[i, i].item() / max(1, matrix[i].sum().item()) == pytest.approx(
            summary["per_class"][name]["recall"], abs=1e-12
        )
    off = matrix.clone().fill_diagonal_(0)
    pairs = summary["confused_pairs"]
    for pair in pairs:
        assert pair["count"] == off[classes.index(pair["true"]), classes.index(pair["predicted"])].item() > 0
    expected = sorted((v for v in off.flatten().tolist() if v > 0), reverse=True)[:TOP_PAIRS]
    assert [pair["count"] for pair in pairs] == expected  # the most frequent mistakes, most frequent first


def test_a_run_writes_predictions_confused_pairs_gallery_and_per_class_chart(tmp_path, capsys):
    summary = run_in_process(tmp_path, *TINY, "plots=true")
    rows = read_rows(tmp_path)
    assert len(rows) == 360  # the whole digits test split
    assert [row["sample"] for row in rows] == [str(i) for i in range(360)]  # a built-in set: the index
    assert_rows_agree_with_summary(rows, summary, "test")
    assert summary["confused_pairs"], "a one-epoch model makes mistakes"
    shown = capsys.readouterr().out
    first = summary["confused_pairs"][0]
    assert "most confused classes (test)" in shown and f"{first['count']}" in shown

    with Image.open(tmp_path / "plots" / "top_losses.png") as gallery:
        gallery.load()
        assert gallery.format == "PNG" and gallery.width == 840  # four 2.1-inch tiles a row at 100 dpi
        assert gallery.height > gallery.width  # four rows of 16 images, each with its title
        assert len(gallery.convert("L").getcolors(256)) > 20  # images drawn, not a blank page
    with Image.open(tmp_path / "plots" / "per_class.png") as chart:
        chart.load()
        assert chart.format == "PNG" and chart.size == (700, 420)  # ten classes: 7 x 4.2 inches


def test_an_image_folder_run_names_its_files_and_evaluate_writes_the_same_rows(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "images", per_class=12, size=(12, 12))
    data = ["data=imagefolder", f"data.root={root}", "data.image_size=12", "data.test_fraction=0.3"]
    run_dir = tmp_path / "run"
    trained = run_in_process(run_dir, *TINY, *data, "data.batch_size=8")  # plots=false: the tables all the same
    rows = read_rows(run_dir)
    assert len(rows) == sum(c["support"] for c in trained["per_class"].values())
    for row in rows:
        path = Path(row["sample"])
        assert path.is_file() and root in path.parents, path  # the file's own path
        assert path.parent.name == row["true"]  # its class folder is its true label
    assert len({row["sample"] for row in rows}) == len(rows)
    assert_rows_agree_with_summary(rows, trained, "test")
    assert not (run_dir / "plots").exists()

    evaluated = run_in_process(tmp_path / "eval", "task=evaluate", f"model.weights={run_dir}", "plots=true")
    assert read_rows(tmp_path / "eval") == rows  # the same model on the same files: the same rows
    assert evaluated["confused_pairs"] == trained["confused_pairs"]
    for name, size in (("top_losses.png", None), ("per_class.png", (600, 420))):
        with Image.open(tmp_path / "eval" / "plots" / name) as picture:
            picture.load()
            assert picture.format == "PNG" and (size is None or picture.size == size), (name, picture.size)
