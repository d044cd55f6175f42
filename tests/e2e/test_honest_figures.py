"""A figure means what its name says: test-time augmentation and EMA are reported beside the model's own figures,
never in their place, and a run whose setting makes a figure meaningless says so."""

from __future__ import annotations

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
