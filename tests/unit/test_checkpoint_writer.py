"""Checkpoints written in the background (checkpoint_writer.py): best.pt as a hard link to last.pt's bytes, errors
handed back to the training thread, files that stay whole when the process is killed mid-write, and the cheap
non-finite check that runs before every checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from shelltrain import rundir
from shelltrain.checkpoint import load_checkpoint, non_finite_entry, serialize
from shelltrain.checkpoint_writer import CheckpointWriter
from shelltrain.errors import UserError


def checkpoint(epoch: int) -> rundir.FileBytes:
    return serialize({"model": {"w": torch.full((4,), float(epoch))}, "epoch": epoch})


def test_best_is_a_hard_link_to_last_and_keeps_its_epoch_when_last_moves_on(tmp_path):
    writer = CheckpointWriter()
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    writer.submit([(checkpoint(1), last), (last, best)])
    writer.wait()
    assert os.stat(last).st_ino == os.stat(best).st_ino  # one file on disk, two names
    assert writer.bytes_written == rundir.byte_count(checkpoint(1))  # the link wrote nothing
    writer.submit([(checkpoint(2), last)])  # epoch 2 did not improve: best.pt keeps epoch 1
    writer.wait()
    assert load_checkpoint(last)["epoch"] == 2
    assert load_checkpoint(best)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_without_hard_links_best_gets_a_copy_of_the_bytes(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    writer = CheckpointWriter()
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    writer.submit([(checkpoint(3), last), (last, best)])
    writer.wait()
    assert os.stat(last).st_ino != os.stat(best).st_ino
    assert load_checkpoint(best)["epoch"] == 3
    assert writer.bytes_written == 2 * rundir.byte_count(checkpoint(3))


def test_a_failed_background_write_is_raised_once_and_keeps_the_previous_file(tmp_path, monkeypatch):
    writer = CheckpointWriter()
    last = tmp_path / "last.pt"
    writer.submit([(checkpoint(1), last)])
    writer.wait()
    monkeypatch.setattr(rundir, "_write_durably", lambda tmp, data: (_ for _ in ()).throw(OSError(28, "full")))
    writer.submit([(checkpoint(2), last)])
    with pytest.raises(UserError, match="cannot write .*last.pt.*full"):
        writer.wait()
    writer.wait()  # raised once: the error is not repeated
    assert load_checkpoint(last)["epoch"] == 1


KILLED_WHILE_WRITING = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from shelltrain.checkpoint import serialize
    from shelltrain.checkpoint_writer import CheckpointWriter

    folder = Path(sys.argv[1])
    writer = CheckpointWriter()
    last, best = folder / "last.pt", folder / "best.pt"
    weights = torch.randn(2_000_000)  # 8 MB: each write takes long enough to be hit
    for epoch in range(1, 10_000):
        data = serialize({"model": {"w": weights}, "epoch": epoch})
        files = [(data, last)]
        if epoch % 3 == 1:  # an improving epoch: best.pt follows last.pt
            files.append((last, best))
        writer.submit(files)
        (folder / "submitted").write_text(str(epoch))
    """
)


def test_a_kill_during_background_writes_leaves_loadable_last_and_best(tmp_path):
    """SIGKILL lands while the writer thread writes (temporary files present): last.pt and best.pt each load whole
    and best.pt is never ahead of last.pt, as the resume's best.pt repair expects."""
    for attempt in range(2):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        _kill_mid_write(folder)
        last, best = load_checkpoint(folder / "last.pt"), load_checkpoint(folder / "best.pt")  # both whole
        assert last["model"]["w"].shape == best["model"]["w"].shape == (2_000_000,)
        assert 1 <= best["epoch"] <= last["epoch"] and best["epoch"] % 3 == 1, (best["epoch"], last["epoch"])


def _kill_mid_write(folder) -> None:
    """Start the writing process, SIGKILL it once it has written twice and a temporary file is there."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_WRITING, str(folder)])
    submitted = folder / "submitted"
    try:
        _wait_for(lambda: submitted.exists() and int(submitted.read_text() or 0) >= 2)
        _wait_for(lambda: bool(list(folder.glob(".last.pt.*.tmp"))))  # a write is under way
    finally:
        proc.kill()
        proc.wait()


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "the writer never got there"
        time.sleep(0.001)


def test_non_finite_entry_names_the_tensor_and_ignores_a_sum_that_only_overflows():
    huge = {"a": torch.full((8,), 3e38)}  # finite values whose float32 sum is infinite
    assert non_finite_entry(huge, {}) is None
    broken = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}
    assert non_finite_entry(broken, {}) == "the model's b"
    optimizer = {0: {"momentum_buffer": torch.tensor([float("inf"), 1.0]), "step": torch.tensor(3.0)}}
    assert non_finite_entry({"a": torch.ones(2)}, optimizer) == "the optimizer's momentum_buffer of parameter 0"
