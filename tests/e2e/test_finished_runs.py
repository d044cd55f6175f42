"""Never lose a finished result: a resumed sweep matches each job to its own run, a run directory inside a running
sweep is refused, `..` in a run directory is the same directory, and a refused command changes nothing (issue 34)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from conftest import shelltrain_forked

from shelltrain import rundir

TINY = [
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "debug=smoke",
    "trainer.device=cpu",
    "trainer.threads=1",
    "plots=false",
]


def hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (its .hydra/ record, train.log and lock file included) by its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def sweep(cwd: Path, values: str, *extra: str) -> str:
    result = shelltrain_forked("-m", f"trainer.seed={values}", *TINY, "hydra.sweep.dir=sweep", *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def seed_of(job_dir: Path) -> list[str]:
    return [o for o in yaml.safe_load((job_dir / ".hydra/overrides.yaml").read_text()) if o.startswith("trainer.seed")]


def test_a_resumed_sweep_with_a_subset_or_reordered_values_leaves_every_finished_job_byte_for_byte(tmp_path):
    sweep(tmp_path, "0,1")
    jobs = {job: hashes(tmp_path / "sweep" / job) for job in ("0", "1")}
    assert seed_of(tmp_path / "sweep/0") == ["trainer.seed=0"]
    (tmp_path / "elsewhere").mkdir()
    for values, extra in (("1", []), ("1,0", ["hydra.sweep.dir=elsewhere/../sweep"])):
        out = sweep(tmp_path, values, "trainer.resume=auto", *extra)
        assert {job: hashes(tmp_path / "sweep" / job) for job in ("0", "1")} == jobs, values
        assert f"its run in '{tmp_path / 'sweep/1'}' already finished" in out  # what it reused, said
        assert "2 runs: 2 completed" in out
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


def test_a_resumed_sweep_continues_each_unfinished_run_where_it_is_and_starts_new_values_in_free_directories(
    tmp_path,
):
    sweep(tmp_path, "0,1")
    (tmp_path / "sweep/1/summary.json").unlink()  # job 1 was killed after training, before its report
    untouched = hashes(tmp_path / "sweep/0")
    record = hashes(tmp_path / "sweep/1/.hydra")
    out = sweep(tmp_path, "2,1", "trainer.resume=auto")  # job 0 is seed 2 (new), job 1 ... is seed 1 again
    assert hashes(tmp_path / "sweep/0") == untouched  # no job wrote into another job's run
    assert f"continuing its run in '{tmp_path / 'sweep/1'}'" in out
    assert {k: v for k, v in hashes(tmp_path / "sweep/1/.hydra").items() if "/" not in k} == record
    assert "trainer.seed=1" in (tmp_path / "sweep/1/.hydra/resume-1/overrides.yaml").read_text()
    assert json.loads((tmp_path / "sweep/1/summary.json").read_text())["status"] == "completed"
    assert seed_of(tmp_path / "sweep/2") == ["trainer.seed=2"]  # the new value: a free numbered directory
    assert json.loads((tmp_path / "sweep/2/summary.json").read_text())["status"] == "completed"


def test_a_run_directory_inside_a_running_sweep_is_refused_before_it_writes(tmp_path):
    held = tmp_path / "sweep"
    rundir.lock(held, "hydra.sweep.dir", "sweep")  # a sweep running in another process
    try:
        before = hashes(held)
        result = shelltrain_forked(*TINY, "hydra.run.dir=sweep/1", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "lies inside" in result.stderr, result.stderr
        assert hashes(held) == before and not (held / "1").exists()
    finally:
        rundir.unlock(held)


def test_a_run_directory_given_with_dot_dot_is_the_same_directory(tmp_path):
    result = shelltrain_forked(*TINY, "hydra.run.dir=runs/../runs/x", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "runs/x/summary.json").read_text())["status"] == "completed"


def test_a_refused_resume_or_predict_changes_nothing_in_the_run_directory(tmp_path):
    trained = shelltrain_forked(*TINY, "hydra.run.dir=run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "run"
    (run / "summary.json").unlink()  # killed after training: a resume has something to do
    before = hashes(run)
    refused = {
        "resume, another model": [*TINY, "model.width=16", "trainer.resume=run"],
        "resume in place, another optimizer": [*TINY, "optimizer=adam", "hydra.run.dir=run", "trainer.resume=run"],
        "predict without images": [*TINY, "task=predict", "model.weights=run", "hydra.run.dir=run"],
    }
    for name, args in refused.items():
        result = shelltrain_forked(*args, cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        assert hashes(run) == before, name
    assert not (tmp_path / "outputs").exists()
