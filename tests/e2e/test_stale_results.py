"""Never report a stale result: a crash between an epoch's two checkpoint writes, and SWA's BatchNorm recompute in a
resumed run, give what the uninterrupted run gives (issue 34)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import run_in_process

from shelltrain import checkpoint_writer, rundir, runner

# Three short epochs of a tiny model, reproducible to the bit; val_loss falls every epoch, so the last is the best.
SHORT = [
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "trainer.deterministic=true",
    "trainer.epochs=3",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.threads=1",
    "trainer.monitor=val_loss",
    "plots=false",
]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _epoch(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["epoch"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run_in_process(run_dir, *SHORT)
    assert _summary(run_dir)["best_epoch"] >= 2  # the crash below lands on an improving epoch after the first
    return run_dir


def _die_after_first_write_of_epoch(monkeypatch, epoch: int) -> None:
    """The process dies right after the first of an epoch end's two files (last.pt, then best.pt: a hard link to it
    or a copy) is on disk: the background writer hands the error to the training thread, which ends the run."""
    real = checkpoint_writer.write_atomic

    def write(data: rundir.FileBytes, path: Path) -> None:
        real(data, path)
        if Path(path).name in ("last.pt", "best.pt"):
            whole = b"".join(rundir.pieces(data))  # a checkpoint comes in pieces
            saved = torch.load(io.BytesIO(whole), weights_only=True)
            if saved["epoch"] == epoch and saved["train_state"]["batch"] == 0:
                raise RuntimeError("simulated crash between the two checkpoint writes")

    monkeypatch.setattr(checkpoint_writer, "write_atomic", write)


def test_a_crash_between_the_last_and_best_writes_resumes_to_the_best_epochs_model(tmp_path, monkeypatch, straight):
    best_epoch = _summary(straight)["best_epoch"]
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _die_after_first_write_of_epoch(patch, best_epoch)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_in_process(run_dir, *SHORT)
    assert _epoch(run_dir / "checkpoints/last.pt") == best_epoch  # the crash came after last.pt ...
    assert _epoch(run_dir / "checkpoints/best.pt") < best_epoch  # ... and before best.pt
    resumed = run_in_process(run_dir, *SHORT, f"trainer.resume={run_dir}")
    assert _epoch(run_dir / "checkpoints/best.pt") == resumed["best_epoch"] == best_epoch
    expected = _summary(straight)
    assert (resumed["test_acc"], resumed["test_loss"]) == (expected["test_acc"], expected["test_loss"])


SWA = [*SHORT, "augmentation=seed", "trainer.swa.start_epoch=2", "trainer.swa.lr=0.02"]


def test_swa_batchnorm_recompute_of_a_run_resumed_after_training_equals_the_uninterrupted_runs(tmp_path, monkeypatch):
    straight = run_in_process(tmp_path / "straight", *SWA)
    run_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:  # training finished, every checkpoint written; the test stage never ran

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash after training")

        patch.setattr(runner, "restore_best", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_in_process(run_dir, *SWA)
    resumed = run_in_process(run_dir, *SWA, f"trainer.resume={run_dir}")
    figures = ("swa_test_acc", "swa_test_loss", "swa_epochs_averaged", "test_acc", "test_loss")
    assert {k: resumed[k] for k in figures} == {k: straight[k] for k in figures}
    a, b = (torch.load(d / "checkpoints/swa.pt", weights_only=True)["model"] for d in (tmp_path / "straight", run_dir))
    for key in a:  # the recomputed BatchNorm statistics included
        assert torch.equal(a[key], b[key]), key
