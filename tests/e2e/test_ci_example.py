"""examples/ci/gate_against_baseline.sh as CI runs it: a stored baseline, then a re-run with another seed (passes:
the difference is noise) and a change that breaks the augmentation (every train image inverted: fails, exit 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "ci" / "gate_against_baseline.sh"
BROKEN = "augmentation.train=[{_target_:torchvision.transforms.v2.RandomInvert,p:1.0}]"


def gate(tmp_path: Path, candidate: str, *change: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "baseline"), str(tmp_path / candidate), "trainer.device=cpu", *change],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_a_seed_change_passes_and_a_broken_augmentation_fails(tmp_path: Path) -> None:
    again = gate(tmp_path, "seed1", "trainer.seed=1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "McNemar exact test" in again.stdout
    broken = gate(tmp_path, "broken", BROKEN)
    assert broken.returncode == 3, broken.stderr[-2000:]
    verdict = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert verdict["baseline"]["significant"] and verdict["baseline"]["acc_diff"] < -0.02
    assert "gate missed" in broken.stderr
