"""Concurrency: one writer per run and sweep directory, interrupted and orphaned joblib sweeps, threads per job.

The fast test holds a directory from a helper process; the races between two real commands are slow.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shelltrain, shelltrain_forked, start_shelltrain

from shelltrain import rundir

TINY = ["model=cnn", "model.width=8", "data.image_size=16", "debug=smoke", "trainer.device=cpu", "plots=false"]
HOLD = "import sys, time; from shelltrain import rundir; rundir.lock(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def _holder(directory: Path) -> subprocess.Popen:
    """Another process holding `directory`'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_or_sweep_directory_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    holders = [_holder(run_dir), _holder(sweep_dir)]
    try:
        refused = shelltrain_forked(*TINY, "hydra.run.dir=run", cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        line = refused.stderr.strip()
        assert len(line.splitlines()) == 1
        assert f"hydra.run.dir '{run_dir}' is in use by another shelltrain process (PID {holders[0].pid} on " in line
        assert "started 20" in line and f"hydra.run.dir={run_dir}-new" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [rundir.LOCK]  # nothing written beside the holder
        refused = shelltrain_forked("-m", *TINY, "trainer.seed=0,1", "hydra.sweep.dir=sweep", cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert f"hydra.sweep.dir '{sweep_dir}' is in use by another shelltrain process (PID {holders[1].pid}" in (
            refused.stderr
        )
        assert sorted(p.name for p in sweep_dir.iterdir()) == [rundir.LOCK]
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
    taken = shelltrain_forked(*TINY, "hydra.run.dir=run", cwd=tmp_path)  # the holder died without letting go
    assert taken.returncode == 0, taken.stderr
    assert f"took over the lock of '{run_dir}' from a process that is gone (PID {holders[0].pid} on " in taken.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert (run_dir / rundir.LOCK).read_text() == ""  # let go at the end: the next holder sees no dead one


def test_temporary_files_have_names_of_their_own(tmp_path, monkeypatch):
    written = []
    original = rundir._write_durably
    monkeypatch.setattr(rundir, "_write_durably", lambda tmp, data: (written.append(tmp.name), original(tmp, data)))
    rundir.write_text("a", tmp_path / "last.pt")
    rundir.write_text("b", tmp_path / "last.pt")
    assert len(set(written)) == 2 and all(name.startswith(f".last.pt.{os.getpid()}-") for name in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_two_runs_started_together_on_one_run_dir_one_refuses_and_the_survivor_is_consistent(tmp_path):
    first = start_shelltrain(*TINY, "trainer.epochs=2", "hydra.run.dir=run", "trainer.seed=1", cwd=tmp_path)
    time.sleep(0.005)
    second = start_shelltrain(*TINY, "trainer.epochs=2", "hydra.run.dir=run", "trainer.seed=2", cwd=tmp_path)
    results = [(p, *p.communicate(timeout=300)) for p in (first, second)]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [err for _, _, err in results]
    loser_err = next(err for p, _, err in results if p.returncode == 2)
    assert "is in use by another shelltrain process (PID" in loser_err
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / ".hydra/config.yaml").read_text()
    seed = 1 if first.returncode == 0 else 2
    assert f"seed: {seed}\n" in config and not list((run_dir / ".hydra").glob("*-1"))  # the survivor's record alone
    epochs = [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]  # one row per epoch
    evaluated = shelltrain_forked(*TINY, "task=evaluate", "model.weights=run", "hydra.run.dir=eval", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval/summary.json").read_text())["test_acc"] == pytest.approx(summary["test_acc"])


@pytest.mark.slow
def test_two_sweeps_started_together_on_one_sweep_dir_one_refuses(tmp_path):
    args = ["-m", *TINY, "trainer.seed=0,1", "hydra.sweep.dir=sweep"]
    procs = [start_shelltrain(*args, cwd=tmp_path)]
    time.sleep(0.005)
    procs.append(start_shelltrain(*args, "optimizer.lr=0.05", cwd=tmp_path))
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    assert sorted(p.returncode for p, _, _ in results) == [0, 2], [err for _, _, err in results]
    survivor = 0 if procs[0].returncode == 0 else 1
    rows = (tmp_path / "sweep/summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all("completed" in row for row in rows[1:])
    overrides = (tmp_path / "sweep/0/.hydra/overrides.yaml").read_text()
    assert ("optimizer.lr=0.05" in overrides) == (survivor == 1)


# ---- joblib sweeps: interrupted, orphaned --------------------------------------------------------------------------

JOBLIB = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "trainer.checkpoint_every_n_steps=1"]


def _joblib_sweep(tmp_path: Path) -> subprocess.Popen:
    """4 jobs, 2 at a time: jobs 0 and 1 finish at once, jobs 2 and 3 train long enough to be caught."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    args = [
        *JOBLIB,
        "trainer.epochs=1,3",
        "trainer.limit_train_batches=150",
        "trainer.seed=0,1",
        "hydra.sweep.dir=sweep",
    ]
    return start_shelltrain(*args, cwd=tmp_path, new_session=True)


def _status(job_dir: Path) -> str | None:
    try:
        return json.loads((job_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _wait_for_a_running_job(tmp_path: Path, proc: subprocess.Popen) -> None:
    """Until jobs 0 and 1 finished and job 2 or 3 has written a checkpoint."""
    deadline = time.time() + 240
    sweep = tmp_path / "sweep"
    while time.time() < deadline and proc.poll() is None:
        finished = all(_status(sweep / str(j)) == "completed" for j in (0, 1))
        if finished and any((sweep / str(j) / "checkpoints/last.pt").exists() for j in (2, 3)):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(proc.communicate())


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow
def test_sigint_to_a_joblib_sweep_records_every_job_and_the_printed_command_completes_it(tmp_path):
    proc = _joblib_sweep(tmp_path)
    _wait_for_a_running_job(tmp_path, proc)
    sweep = tmp_path / "sweep"
    finished = {j: (sweep / str(j) / "metrics.csv").read_bytes() for j in (0, 1)}
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    command = err.split("Resume with:\n", 1)[1].strip().splitlines()[0]
    assert command.endswith(f"hydra.sweep.dir={sweep} trainer.resume=auto")
    statuses = [_status(sweep / str(j)) for j in range(4)]
    assert statuses[:2] == ["completed", "completed"] and "interrupted" in statuses[2:], statuses
    assert all(s in ("completed", "interrupted") for s in statuses), statuses
    assert (sweep / "summary.csv").is_file()

    resumed = shelltrain(*shlex.split(command)[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [_status(sweep / str(j)) for j in range(4)] == ["completed"] * 4
    assert {j: (sweep / str(j) / "metrics.csv").read_bytes() for j in (0, 1)} == finished  # not redone
    assert _group_alive(proc.pid) == []


@pytest.mark.slow
def test_sigkill_of_a_joblib_sweeps_process_leaves_no_process_behind(tmp_path):
    proc = _joblib_sweep(tmp_path)
    _wait_for_a_running_job(tmp_path, proc)
    assert len(_group_alive(proc.pid)) > 1  # the sweep's process and its workers
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    left = _group_alive(proc.pid)
    for pid in left:  # leave the machine clean for the next test either way
        os.kill(pid, signal.SIGKILL)
    assert left == []


# ---- threads of parallel jobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_jobs", "threads", "expected"), [(2, None, 4), (-1, None, 1), (3, None, 2), (2, 3, 3)])
def test_parallel_jobs_share_the_cores_unless_trainer_threads_is_set(monkeypatch, n_jobs, threads, expected):
    import torch
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from shelltrain.environment import seed_everything

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    hydra_cfg = OmegaConf.create({"hydra": {"launcher": {"_target_": "JoblibLauncher", "n_jobs": n_jobs}}})
    monkeypatch.setattr(HydraConfig.instance(), "cfg", hydra_cfg)
    try:
        seed_everything(0, False, threads)
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
