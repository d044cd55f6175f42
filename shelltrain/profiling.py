"""trainer.profile=true: torch.profiler over a few optimizer steps of the first epoch, as an engine Callback.

The schedule skips WAIT steps (the first batches pay one-off costs), warms up for WARMUP, then records ACTIVE steps;
an epoch with fewer steps (debug=smoke, a small data set) gets a shorter schedule, and the recording always ends with
the first epoch's last batch. The trace goes to the run directory as a Chrome trace (profile_trace.json, which
Perfetto's ui.perfetto.dev and TensorBoard's profiler open) and the top operators by self CPU time are printed.

The profiler is always stopped, even when training ends early: a profiler left running at exit crashes the
process (a segmentation fault after the run has finished)."""

from __future__ import annotations

import atexit
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.text import Text
from torch.profiler import ProfilerActivity, profile, schedule

from shelltrain import rundir
from shelltrain.console import show
from shelltrain.engine import Callback, TrainState
from shelltrain.errors import UserError

WAIT, WARMUP, ACTIVE = 1, 1, 3  # optimizer steps in each phase of the profiler's schedule
TOP_OPERATORS = 15
QUIET_KINETO = "6"  # above every level of the profiler library's own log: no device messages on a CPU run


def phases(num_batches: int) -> tuple[int, int, int]:
    """(wait, warmup, active) that fit in an epoch of `num_batches` batches, so the recording is ever made."""
    if num_batches >= WAIT + WARMUP + ACTIVE:
        return WAIT, WARMUP, ACTIVE
    warmup = 1 if num_batches >= 2 else 0
    return 0, warmup, max(1, num_batches - warmup)


class StepProfiler(Callback):
    """Starts the profiler with the first epoch, steps it with the optimizer and stops it at that epoch's end."""

    def __init__(self, run_dir: Path, device: torch.device, console: Any):
        self.run_dir, self.console = run_dir, console
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        if device.type != "cuda":  # the CUDA build of torch says "ERROR ... gpuGetDeviceCount" on a CPU machine
            os.environ.setdefault("KINETO_LOG_LEVEL", QUIET_KINETO)
        self.profiler: profile | None = None
        self.plan = (WAIT, WARMUP, ACTIVE)
        self.num_batches = self.stepped = 0
        self.written = self.done = False

    def on_epoch_start(self, epoch: int, num_batches: int) -> None:
        if self.profiler is not None or self.done:
            return
        self.plan, self.num_batches = phases(num_batches), num_batches
        wait, warmup, active = self.plan
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")  # a one-step epoch
            plan = schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        self.profiler = profile(
            activities=self.activities, schedule=plan, on_trace_ready=self._write, record_shapes=True
        )
        self.profiler.start()
        atexit.register(self._finish)  # a run stopped mid-epoch (a signal, an error) still stops the profiler

    def on_step(self, state: TrainState) -> None:
        if self.profiler is not None and not self.done:
            self.profiler.step()
            self.stepped += 1
            if self.written:
                self._finish()

    def on_batch_end(self, batch: int, loss: float, acc: float, images_per_second: float) -> None:
        if self.profiler is not None and batch >= self.num_batches:
            self._finish()  # the first epoch's last batch: whatever was recorded is written now

    def _finish(self) -> None:
        """Stops the profiler once; one still recording writes its trace here."""
        if self.done or self.profiler is None:
            return
        self.done = True
        atexit.unregister(self._finish)
        self.profiler.stop()
        if not self.written:
            show(self.console, Text("trainer.profile: no trace: the first epoch ended before a step was recorded"))

    def _write(self, profiler: profile) -> None:
        """The trace file (exported beside, then moved in atomically) and the table of the top operators."""
        self.written = True
        wait, warmup, active = self.plan
        recorded = max(1, min(active, self.stepped - wait - warmup))
        target = rundir.profile_trace(self.run_dir)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                exported = Path(tmp) / rundir.PROFILE_TRACE
                profiler.export_chrome_trace(str(exported))
                rundir.write_atomic(exported.read_bytes(), target)
        except (OSError, UserError) as exc:  # the profile is an extra: the run goes on without its trace
            show(self.console, Text(f"trainer.profile: no trace written: {exc}"))
            target = None
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP_OPERATORS)
        steps = f"{recorded} step" + ("s" if recorded > 1 else "")
        show(self.console, Text(f"trainer.profile: top operators by self CPU time over {steps}\n{table}"))
        if target is not None:
            show(self.console, Text(f"trace: {target} (ui.perfetto.dev or TensorBoard)"))


def build_profiler(enabled: bool, run_dir: Path, device: Any, console: Any) -> StepProfiler | None:
    """The profiler callback with trainer.profile=true (rank 0 only: the caller decides)."""
    return StepProfiler(run_dir, torch.device(device), console) if enabled else None
