"""gate.baseline from the command line: a comparison printed and recorded when the runs share their test images,
and one line with exit code 2, before training, for a baseline that is not a run, has no per-sample predictions,
or was tested on other images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import shelltrain_forked

SMOKE = ["model=cnn", "model.width=8", "debug=smoke", "trainer.device=cpu", "plots=false", "report.html=false"]


def test_baseline_gate_compares_and_refuses_in_one_line(tmp_path: Path) -> None:
    base = shelltrain_forked(*SMOKE, "hydra.run.dir=base", cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    again = shelltrain_forked(*SMOKE, "trainer.seed=1", "hydra.run.dir=new", "gate.baseline=base", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "baseline: McNemar exact test:" in again.stdout
    section = json.loads((tmp_path / "new" / "summary.json").read_text())["baseline"]
    assert section["run"] == str(tmp_path / "base") and section["samples"] > 0

    other = shelltrain_forked(*SMOKE, "data.split_seed=7", "hydra.run.dir=other", "gate.baseline=base", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().count("\n") == 0 and "its test images differ from this run's" in other.stderr
    assert not (tmp_path / "other" / "checkpoints").exists()  # said before training

    missing = shelltrain_forked(*SMOKE, "hydra.run.dir=never", "gate.baseline=nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "not a shelltrain run directory" in missing.stderr
    assert not (tmp_path / "never").exists()  # refused before anything was written

    shutil.copytree(tmp_path / "base", tmp_path / "bare")
    (tmp_path / "bare" / "predictions.csv").unlink()
    bare = shelltrain_forked(*SMOKE, "hydra.run.dir=x", "gate.baseline=bare", cwd=tmp_path)
    assert bare.returncode == 2 and "no per-sample predictions" in bare.stderr
