"""No job writes over another job's records: a finished run and a finished sweep survive, byte for byte, every
other command pointed at them (docs/resume-and-failures.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import shelltrain_forked
from PIL import Image

TINY = ["model=cnn", "model.width=8", "data.image_size=16", "debug=smoke", "trainer.device=cpu", "plots=false"]


def hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (its .hydra/ record and train.log included) by its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_evaluate_or_a_re_run_into_a_finished_run_is_refused_and_leaves_it_byte_for_byte(tmp_path):
    """The default selection's share of the test below: the two commands users point at a run most often."""
    trained = shelltrain_forked(*TINY, "hydra.run.dir=run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "run"
    before = hashes(run)
    for args in ([*TINY, "task=evaluate", "model.weights=run", "hydra.run.dir=run"], [*TINY, "hydra.run.dir=run"]):
        result = shelltrain_forked(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "hydra.run.dir" in result.stderr, result.stderr
        assert hashes(run) == before


@pytest.mark.slow
def test_a_finished_run_and_sweep_survive_every_other_command(tmp_path):
    trained = shelltrain_forked(*TINY, "hydra.run.dir=run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    swept = shelltrain_forked("-m", "optimizer.lr=0.01,0.02", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("L", (16, 16), color=40 * i).save(images / f"{i}.png")
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    before = {run: hashes(run), sweep: hashes(sweep)}
    assert {".hydra/config.yaml", "train.log", "summary.json", "checkpoints/last.pt"} <= set(before[run])
    assert {"summary.csv", "multirun.yaml", "0/.hydra/overrides.yaml", "1/summary.json"} <= set(before[sweep])

    refused = {  # each would write into the finished run or sweep: exit 2, one line, nothing written
        "re-run": [*TINY, "optimizer.lr=0.5", "hydra.run.dir=run"],  # another config: another .hydra/
        "re-run a sweep": ["-m", "optimizer.lr=0.01,0.02", *TINY, "hydra.sweep.dir=sweep"],
        "re-run a sweep job": [*TINY, "optimizer.lr=0.01", "hydra.run.dir=sweep/0"],
        "evaluate": [*TINY, "task=evaluate", "model.weights=run", "hydra.run.dir=run"],
        "predict": [*TINY, "task=predict", "model.weights=sweep/1", f"predict.input={images}", "hydra.run.dir=sweep/1"],
        "export": [*TINY, "task=export", "export.format=torchscript", "model.weights=run", "hydra.run.dir=run"],
        "ensemble": [*TINY, "ensemble=average", "ensemble.checkpoints=[sweep/0,sweep/1]", "hydra.run.dir=run"],
    }
    for name, args in refused.items():
        result = shelltrain_forked(*args, cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
        assert "hydra.run.dir" in result.stderr or "hydra.sweep.dir" in result.stderr, (name, result.stderr)
        assert {run: hashes(run), sweep: hashes(sweep)} == before, name

    reading = {  # each reads the finished run or sweep and writes elsewhere (summary: the same table again)
        "evaluate": [*TINY, "task=evaluate", "model.weights=run"],
        "predict": [*TINY, "task=predict", "model.weights=run", f"predict.input={images}"],
        "export": [*TINY, "task=export", "export.format=torchscript", "model.weights=sweep/0"],
        "ensemble": [*TINY, "trainer.epochs=0", "ensemble=average", "ensemble.checkpoints=[sweep/0,sweep/1]"],
        "summary": ["summarize", "sweep"],
    }
    for name, args in reading.items():
        result = shelltrain_forked(*args, cwd=tmp_path)
        assert result.returncode == 0, (name, result.stderr)
        assert {run: hashes(run), sweep: hashes(sweep)} == before, name


@pytest.mark.slow
def test_a_resume_keeps_the_original_hydra_record_and_records_its_own_beside_it(tmp_path):
    trained = shelltrain_forked(*TINY, "hydra.run.dir=run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    swept = shelltrain_forked("-m", "optimizer.lr=0.01,0.02", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    original = {path: hashes(path / ".hydra") for path in (run, sweep / "0", sweep / "1")}

    for n, args in enumerate([["trainer.resume=run"], ["hydra.run.dir=run", "trainer.resume=run"]], start=1):
        resumed = shelltrain_forked(*args, cwd=tmp_path)  # the second as the printed resume command
        assert resumed.returncode == 0, resumed.stderr
        record = {k: v for k, v in hashes(run / ".hydra").items() if not k.startswith("resume-")}
        assert record == original[run], args
        assert "trainer.resume=run" in (run / f".hydra/resume-{n}/overrides.yaml").read_text()
    finished = {job: hashes(sweep / job) for job in ("0", "1")}
    resumed = shelltrain_forked(
        "-m", "optimizer.lr=0.01,0.02", *TINY, "hydra.sweep.dir=sweep", "trainer.resume=auto", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    for job in ("0", "1"):  # a finished sweep job is reused as it was: no record, no log line (issue 34)
        assert hashes(sweep / job) == finished[job], job
        assert hashes(sweep / job / ".hydra") == original[sweep / job], job
    assert list(tmp_path.glob("outputs/*/*")) == []  # each resume continued in place
