"""trainer.profile=true: torch.profiler over a few optimizer steps of the first epoch, as an engine Callback.

The schedule skips WAIT steps (the first batches pay one-off costs), warms up for WARMUP, then records ACTIVE steps.
When they are recorded, the trace goes to the run directory as a Chrome trace (profile_trace.json, which Perfetto's
ui.perfetto.dev and TensorBoard's profiler open) and the top operators by self CPU time are printed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from shelltrain import rundir
from shelltrain.engine import Callback, TrainState

WAIT, WARMUP, ACTIVE = 1, 1, 3  # optimizer steps in each phase of the profiler's schedule
TOP_OPERATORS = 15


class StepProfiler(Callback):
    """Starts the profiler with the first epoch and steps it with the optimizer until its schedule is done."""

    def __init__(self, run_dir: Path, device: torch.device, console: Any):
        self.run_dir, self.console = run_dir, console
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
        )
        self.started = self.done = False

    def on_epoch_start(self, epoch: int, num_batches: int) -> None:
        if not self.started:
            self.profiler.start()
            self.started = True

    def on_step(self, state: TrainState) -> None:
        if self.started and not self.done:
            self.profiler.step()

    def _write(self, profiler: profile) -> None:
        """The trace file (exported beside, then moved in atomically) and the table of the top operators."""
        self.done = True
        with tempfile.TemporaryDirectory() as tmp:
            exported = Path(tmp) / rundir.PROFILE_TRACE
            profiler.export_chrome_trace(str(exported))
            rundir.write_atomic(exported.read_bytes(), rundir.profile_trace(self.run_dir))
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP_OPERATORS)
        self.console.print(f"trainer.profile: top operators by self CPU time over {ACTIVE} steps", markup=False)
        self.console.print(table, markup=False, highlight=False)
        self.console.print(f"trace: {rundir.profile_trace(self.run_dir)} (ui.perfetto.dev or TensorBoard)")
        profiler.stop()


def build_profiler(enabled: bool, run_dir: Path, device: Any, console: Any) -> StepProfiler | None:
    """The profiler callback with trainer.profile=true (rank 0 only: the caller decides)."""
    return StepProfiler(run_dir, torch.device(device), console) if enabled else None
