"""trainer.profile=true with very few steps (debug=smoke) and in a sweep: the command exits 0 with a trace, never a
crash at exit (the profiler left running used to end the process with a segmentation fault) nor the profiler
library's device messages on a CPU machine."""

from __future__ import annotations

import json

import pytest
from conftest import shelltrain

SMOKE = ["debug=smoke", "model=cnn", "model.width=8", "data.image_size=16", "trainer.device=cpu", "plots=false"]


def _assert_clean(result, *run_dirs) -> None:
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "ERROR" not in output and "Requested callback" not in output
    for run_dir in run_dirs:
        trace = json.loads((run_dir / "profile_trace.json").read_text())
        assert any(str(e.get("name", "")).startswith("aten::") for e in trace["traceEvents"])


def test_profile_with_two_steps_exits_cleanly_with_a_trace(tmp_path):
    run_dir = tmp_path / "run"
    result = shelltrain(*SMOKE, "trainer.profile=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _assert_clean(result, run_dir)
    assert "top operators by self CPU time over 1 step" in result.stdout
    log = (run_dir / "train.log").read_text()  # the run directory holds what the console showed
    assert "top operators by self CPU time over 1 step" in log and f"trace: {run_dir / 'profile_trace.json'}" in log


@pytest.mark.slow  # the default selection keeps the two-step case; these are variants of it
def test_profile_with_one_batch_and_accumulation_still_writes_its_trace(tmp_path):
    run_dir = tmp_path / "run"
    args = ["trainer.limit_train_batches=3", "trainer.accumulate=4"]  # one optimizer step, at the epoch's end
    result = shelltrain(*SMOKE, *args, "trainer.profile=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    _assert_clean(result, run_dir)


@pytest.mark.slow  # the default selection keeps the two-step case; these are variants of it
def test_profile_in_a_sweep_writes_one_trace_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = shelltrain(
        "-m", *SMOKE, "trainer.profile=true", "trainer.seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    _assert_clean(result, sweep / "0", sweep / "1")
