"""The ONNX Runtime snippet in docs/reports-and-tasks.md, run as a user would, gives task=predict's answers; the
exported file carries the full preprocessing and class names, and the source run's model card."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_in_process
from PIL import Image
from test_tasks import needs_onnx

from shelltrain.export import export_metadata

DOCS = Path(__file__).parents[2] / "docs" / "reports-and-tasks.md"
START, END = "<!-- onnx-snippet:start -->\n```python\n", "```\n<!-- onnx-snippet:end -->"
# A small RGB model on random images, so that its probabilities are far from 0 and 1 and differ per image.
TRAIN = ["data=synthetic", "data.num_samples=90", "data.num_classes=3", "data.image_size=24"]
TRAIN += ["model=cnn", "model.width=4", "trainer.epochs=1"]
SIZES = [(24, 24), (50, 31), (17, 40), (64, 64), (31, 50)]  # width x height: square, wide, tall, up and down


def snippet() -> str:
    """The code between the docs page's snippet markers."""
    text = DOCS.read_text(encoding="utf-8")
    return text[text.index(START) + len(START) : text.index(END)]


def write_images(folder: Path, count: int = 20) -> None:
    generator = torch.Generator().manual_seed(1)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).numpy()
        (folder / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="RGB").save(folder / f"set{i % 2}" / f"{i:02d}.png")


def test_docs_onnx_snippet_gives_task_predicts_classes_and_probabilities(tmp_path):
    needs_onnx()
    run = tmp_path / "run"
    run_in_process(run, *TRAIN)
    images = tmp_path / "images"
    write_images(images)
    run_in_process(tmp_path / "predict", "task=predict", f"model.weights={run}", f"predict.input={images}")
    with open(tmp_path / "predict" / "predictions.csv", newline="") as f:
        expected = {row["file"]: row for row in csv.DictReader(f)}
    exported = run_in_process(tmp_path / "export", "task=export", f"model.weights={run}")

    script = tmp_path / "predict_onnx.py"
    script.write_text(snippet(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), exported["path"], str(images)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(done.stdout.splitlines()))
    assert len(rows) == len(expected) == 20
    for file, name, probability in rows:
        assert name == expected[file]["class"], file
        assert float(probability) == pytest.approx(float(expected[file]["probability"]), abs=1e-5), file
    assert len({row[2] for row in rows}) > 10  # probabilities that differ per image: the preprocessing matters


def test_exported_files_carry_the_full_preprocessing_classes_and_model_card(tmp_path):
    run = tmp_path / "run"
    run_in_process(run, *TRAIN)
    exported = run_in_process(tmp_path / "export", "task=export", "export.format=torchscript", f"model.weights={run}")
    meta = export_metadata("torchscript", Path(exported["path"]))
    assert meta["classes"] == ["0", "1", "2"]
    pre = meta["preprocessing"]
    assert (pre["image_size"], pre["channels"], pre["interpolation"], pre["antialias"]) == (24, 3, "bilinear", True)
    assert len(pre["mean"]) == len(pre["std"]) == 3 and meta["input"] == "images"
    card = tmp_path / "export" / "MODEL_CARD.md"
    assert exported["model_card"] == str(card)
    assert card.read_text(encoding="utf-8") == (run / "MODEL_CARD.md").read_text(encoding="utf-8")

    bare = run_in_process(tmp_path / "bare", *TRAIN, "report.model_card=false")
    assert not (tmp_path / "bare" / "MODEL_CARD.md").exists() and bare["status"] == "completed"
    again = run_in_process(
        tmp_path / "export2", "task=export", "export.format=torchscript", f"model.weights={tmp_path / 'bare'}"
    )
    assert "model_card" not in again and not (tmp_path / "export2" / "MODEL_CARD.md").exists()
