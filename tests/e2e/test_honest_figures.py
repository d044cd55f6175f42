"""A figure means what its name says: test-time augmentation and EMA are reported beside the model's own figures,
never in their place, and a run whose setting makes a figure meaningless says so."""

from __future__ import annotations

import csv

from conftest import run_in_process
from fixtures_data import make_imagefolder

TINY = [
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "trainer.epochs=2",
    "trainer.threads=1",
    "trainer.limit_train_batches=10",
]


def test_test_tta_keeps_test_acc_plain_and_reports_tta_beside_it(tmp_path, capsys):
    run = tmp_path / "run"
    summary = run_in_process(run, *TINY, "trainer.test_tta=hflip", "plots=true")
    evaluated = run_in_process(tmp_path / "eval", "task=evaluate", f"model.weights={run}")
    flipped = run_in_process(tmp_path / "flip", "task=evaluate", f"model.weights={run}", "evaluate.tta=hflip")
    assert summary["test_acc"] == evaluated["test_acc"]  # the headline is the model's own figure
    assert summary["test_acc_tta"] == flipped["test_acc"] and summary["test_loss_tta"] == flipped["test_loss"]
    assert summary["test_tta"] == "hflip"
    assert "test_acc_tta" in capsys.readouterr().out  # the printed table names it
    assert (run / "plots/confusion_matrix.png").exists()


def test_ema_warms_up_by_default_and_warns_when_the_start_dominates(tmp_path, capsys):
    """The docs' example decay (0.999) on a run of 123 steps: without warm-up 89% of the average is the random
    start (about chance accuracy, said in one line); with the default warm-up it follows the trained weights."""
    ema = ["model=cnn", "model.width=8", "data.image_size=16", "trainer.epochs=3", "trainer.threads=1"]
    ema.append("trainer.ema.decay=0.999")
    warmed = run_in_process(tmp_path / "warm", *ema)
    out = capsys.readouterr().out
    assert "ema_val_acc" in out and "leaves" not in out  # the epoch line shows it; no warning is due
    assert warmed["ema_test_acc"] > 0.5 and warmed["ema_test_acc"] > warmed["test_acc"] - 0.15
    with open(tmp_path / "warm/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(row["ema_val_acc"]) > 0 for row in rows)
    cold = run_in_process(tmp_path / "cold", *ema, "trainer.ema.warmup=false")
    warning = [line for line in capsys.readouterr().out.splitlines() if "trainer.ema.decay=0.999" in line]
    assert len(warning) == 1 and "of the average on the starting weights" in warning[0], warning
    assert cold["ema_test_acc"] < warmed["ema_test_acc"]


def test_a_small_image_folder_with_a_large_batch_is_warned_and_the_log_names_the_data(tmp_path, capsys):
    """90 images with the image folder's default batch (128) make one optimizer step per epoch: one line says so and
    names data.batch_size; the log also names the augmentation and, with data.imbalance, the per-class counts."""
    root = make_imagefolder(tmp_path / "images", per_class=30, size=(12, 12))
    folder = ["model=cnn", "model.width=8", "data=imagefolder", f"data.root={root}", "data.image_size=12"]
    run_in_process(tmp_path / "run", *folder, "trainer.epochs=1", "trainer.threads=1", "data.imbalance=3")
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "optimizer step" in line]
    assert len(warning) == 1 and "data.batch_size=128" in warning[0] and "only 1 optimizer step" in warning[0]
    assert "augmentation: none (no random transforms)" in out
    counts = next(line for line in out.splitlines() if "train images per class" in line)
    cat, dog, fox = (int(part.split()[-1]) for part in counts.split(": ")[-1].split(", "))
    assert cat > dog > fox  # long-tailed: class 0 keeps the most
    run_in_process(tmp_path / "small", *folder, "trainer.epochs=1", "trainer.threads=1", "data.batch_size=4")
    assert "optimizer step" not in capsys.readouterr().out  # 15+ steps: no warning
