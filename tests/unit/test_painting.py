"""Pictures drawn beside the run (shelltrain.painting): in other processes that never import torch, failures
raised in the run with their own error, a dead process's pictures drawn in the run, nothing left running."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from shelltrain.painting import Painter, painting


def record_process(path: Path) -> None:
    """A stand-in picture: writes which process drew it and whether that process had imported torch."""
    path.write_text(json.dumps({"pid": os.getpid(), "torch": "torch" in sys.modules}))


def fail_elsewhere(path: Path, run_pid: int) -> None:
    """Fails in a painting process, draws in the run."""
    if os.getpid() != run_pid:
        raise RuntimeError("not here")
    record_process(path)


def always_fail(path: Path) -> None:
    raise ValueError(f"cannot draw {path.name}")


def test_pictures_are_drawn_in_other_processes_without_torch(tmp_path: Path) -> None:
    with painting(True, processes=2) as painter:
        for i in range(4):
            painter.draw(record_process, tmp_path / f"{i}.json")
        painter.wait()
        drawn = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(4)]
    assert {d["pid"] for d in drawn} != {os.getpid()} and len({d["pid"] for d in drawn}) == 2  # round-robin
    assert not any(d["torch"] for d in drawn)


def test_a_failed_picture_is_drawn_again_in_the_run(tmp_path: Path) -> None:
    with painting(True, processes=1) as painter:
        painter.draw(fail_elsewhere, tmp_path / "a.json", os.getpid())
        painter.wait()
    assert json.loads((tmp_path / "a.json").read_text())["pid"] == os.getpid()


def test_a_picture_that_cannot_be_drawn_raises_its_own_error(tmp_path: Path) -> None:
    with painting(True, processes=1) as painter:
        painter.draw(always_fail, tmp_path / "curves.png")
        with pytest.raises(ValueError, match="cannot draw curves.png"):
            painter.wait()


def test_a_dead_process_pictures_are_drawn_in_the_run(tmp_path: Path) -> None:
    painter = Painter(processes=1)
    try:
        (process,) = painter._processes
        os.kill(process._popen.pid, signal.SIGKILL)
        process._popen.wait()
        painter.draw(record_process, tmp_path / "a.json")
        painter.wait()
    finally:
        painter.close()
    assert json.loads((tmp_path / "a.json").read_text())["pid"] == os.getpid()


def test_closing_ends_the_processes_even_with_pictures_pending(tmp_path: Path) -> None:
    painter = Painter(processes=2)
    for i in range(4):
        painter.draw(record_process, tmp_path / f"{i}.json")
    pids = [process._popen.pid for process in painter._processes]
    painter.close()  # a run that failed before waiting
    assert all(process._popen.returncode is not None for process in painter._processes)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_no_processes_draws_at_once(tmp_path: Path) -> None:
    painter = Painter(processes=0)
    painter.draw(record_process, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text())["pid"] == os.getpid()
    with painting(False) as none:
        assert none is None


def test_a_block_inside_another_shares_its_painter(tmp_path: Path) -> None:
    """The CLI's painter serves every run of the job (ensemble members, folds): one process for all."""
    with painting(True, processes=1) as job:
        with painting(True) as run:
            assert run is job
            run.draw(record_process, tmp_path / "a.json")
            run.wait()
        with painting(False) as off:
            assert off is None
        (process,) = job._processes
        assert process._popen.poll() is None  # still there for the next run
    assert process._popen.returncode is not None
    assert json.loads((tmp_path / "a.json").read_text())["pid"] == process._popen.pid
