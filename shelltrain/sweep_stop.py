"""Stopping a process-based sweep (joblib's launcher): the sweep's process decides, its workers follow.

A signal to the sweep's process is appended to the sweep's stop marker (rundir.SWEEP_STOP); each job's worker
watches the marker and turns each signal into a SIGTERM of its own, which stops its job as it stops a single run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shelltrain import rundir
from shelltrain.signals import STOP_SIGNALS, SWEEP_PID_ENV, die_with_parent


def start_launcher_job(sweep_dir: Path) -> threading.Event:
    """At a job's start in a launcher worker: die with the sweep's process, ignore a terminal's SIGINT, and watch
    the sweep's stop marker (`SweepStop`): each signal the sweep's process had becomes one SIGTERM here, which
    stops the job as it stops a single run. Set the returned event when the job ends."""
    die_with_parent()
    if str(os.getppid()) != os.environ.get(SWEEP_PID_ENV):
        os.kill(os.getpid(), signal.SIGKILL)  # the parent died before prctl took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    done = threading.Event()
    marker = rundir.stop_marker(sweep_dir)

    def watch() -> None:
        passed_on = 0
        while not done.wait(0.2):
            asked = len(marker.read_text().split()) if marker.is_file() else 0
            for _ in range(passed_on, asked):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            passed_on = max(passed_on, asked)

    threading.Thread(target=watch, name="shelltrain-sweep-stop", daemon=True).start()
    return done


class SweepStop:
    """In the process of a process-based sweep (joblib): SIGINT or SIGTERM stops the sweep gracefully instead of
    tearing the launcher down. Each signal is appended to the sweep's stop marker, which the running jobs'
    workers turn into a SIGTERM (the first stops a job after its step with a checkpoint, a second at once) and
    jobs not yet started read as "do not start"; the launcher then returns normally."""

    def __init__(self, sweep_dir: Path) -> None:
        self.marker = rundir.stop_marker(sweep_dir)
        self.signum: int | None = None

    def install(self) -> None:
        os.environ[SWEEP_PID_ENV] = str(os.getpid())  # inherited by the workers the launcher starts
        rundir.clear_stop_marker(self.marker)
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Any = None) -> None:
        if os.getpid() != int(os.environ.get(SWEEP_PID_ENV, "0")):
            return  # a worker forked before exec inherited this handler
        first = self.signum is None
        self.signum = self.signum or signum
        rundir.append_stop(self.marker, signal.Signals(signum).name)
        if first:
            name = signal.Signals(signum).name
            sys.stderr.write(
                f"\nshelltrain: {name} received: each running job saves a checkpoint and stops, no further job "
                "starts (a second signal stops the jobs at once)\n"
            )
            sys.stderr.flush()
