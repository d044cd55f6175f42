"""The run-directory layout and the one way files are written (rundir.py)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from shelltrain import rundir
from shelltrain.errors import UserError


def test_names_of_a_run_directory(tmp_path):
    assert rundir.last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    assert rundir.best_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best.pt"
    assert rundir.epoch_checkpoint(tmp_path, 7) == tmp_path / "checkpoints" / "epoch_007.pt"
    assert rundir.summary(tmp_path) == tmp_path / "summary.json"
    assert rundir.member_dir(tmp_path, 2) == tmp_path / "members" / "2"
    assert rundir.fold_dir(tmp_path, 1) == tmp_path / "cv" / "fold_1"
    assert tmp_path / rundir.OVERRIDES == tmp_path / ".hydra" / "overrides.yaml"


def test_kept_epoch_checkpoints_are_found_by_epoch(tmp_path):
    for name in ("epoch_003.pt", "epoch_010.pt", "epoch_best.pt", "last.pt"):
        rundir.write_text("x", tmp_path / "checkpoints" / name)
    assert rundir.epoch_checkpoints(tmp_path) == {
        3: tmp_path / "checkpoints" / "epoch_003.pt",
        10: tmp_path / "checkpoints" / "epoch_010.pt",
    }


def test_has_checkpoint_and_ensemble_runs(tmp_path):
    assert not rundir.has_checkpoint(tmp_path)
    rundir.write_text("x", rundir.last_checkpoint(rundir.member_dir(tmp_path, 0)))
    assert rundir.is_ensemble_run(tmp_path) and rundir.has_checkpoint(tmp_path)
    rundir.write_text("x", rundir.last_checkpoint(tmp_path))
    assert not rundir.is_ensemble_run(tmp_path)  # a run with its own checkpoint is a single run


def test_json_round_trip_with_tensor_like_values(tmp_path):
    class Scalar:
        def item(self) -> float:
            return 0.5

    rundir.write_json({"acc": Scalar(), "path": Path("a/b")}, tmp_path / "s.json")
    assert rundir.read_json(tmp_path / "s.json") == {"acc": 0.5, "path": "a/b"}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    rundir.write_json({"status": "completed"}, path)

    def disk_full(tmp: Path, data: bytes) -> None:
        tmp.write_bytes(data[:3])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "_write_durably", disk_full)
    with pytest.raises(UserError, match="No space left on device .*is full"):
        rundir.write_json({"status": "failed"}, path)
    assert rundir.read_json(path) == {"status": "completed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_remove_if_unused_keeps_a_directory_with_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = tmp_path / "outputs" / "day" / "time"
    rundir.write_text("log", started / rundir.LOG)
    (started / rundir.CHECKPOINTS).mkdir()  # empty: holds nothing
    rundir.remove_if_unused(started)
    assert not (tmp_path / "outputs").exists()  # the empty folders above went too

    rundir.write_text("{}", rundir.summary(started))
    rundir.remove_if_unused(started)
    assert rundir.summary(started).is_file()


def test_json_never_holds_a_bare_nan_and_names_the_non_finite_keys(tmp_path):
    path = tmp_path / "summary.json"
    rundir.write_json({"status": "failed", "test_loss": float("nan"), "per_class": {"cat": {"f1": float("inf")}}}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    import json

    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "status": "failed",
        "test_loss": None,
        "per_class": {"cat": {"f1": None}},
        "non_finite": ["per_class.cat.f1", "test_loss"],
    }
