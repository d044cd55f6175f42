"""The run directory tells everything: train.log holds what the console showed (the final table, the calibration,
where a plain state dict was written), and task=evaluate says when it applies the run's calibration."""

from __future__ import annotations

from conftest import run_in_process

TINY = ["model=cnn", "model.width=8", "data.image_size=16", "debug=smoke", "trainer.threads=1"]


def test_train_log_holds_the_final_table_the_calibration_and_the_exported_file(tmp_path, capsys):
    run = tmp_path / "run"
    summary = run_in_process(run, *TINY, "trainer.calibrate=temperature", "checkpoint.export_state_dict=model.pth")
    log = (run / "train.log").read_text()
    assert "shelltrain summary" in log and "│ test_acc " in log  # the table, as the console drew it
    assert f"{summary['test_acc']:.6g}" in log
    temperature = summary["calibration"]["temperature"]
    assert f"trainer.calibrate=temperature: T={temperature:.4g} (fitted on val); val ECE" in log
    assert f"checkpoint.export_state_dict: {run / 'checkpoints' / 'model.pth'}" in log
    capsys.readouterr()
    run_in_process(tmp_path / "evaluate", "task=evaluate", f"model.weights={run}")
    assert f"the run's calibration is applied (its logits divided by T={temperature:.4g})" in capsys.readouterr().out
