"""A figure means what its name says: test-time augmentation and EMA are reported beside the model's own figures,
never in their place, and a run whose setting makes a figure meaningless says so."""

from __future__ import annotations

import csv

from conftest import run_in_process

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
