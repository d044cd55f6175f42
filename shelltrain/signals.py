"""SIGINT and SIGTERM: a graceful stop while training, a clean exit outside it, and the processes a run starts
(data-loader workers, cache decoders, the pictures' helper) that leave both to the main process and die with it.

Free of torch at import: the CLI installs its SIGTERM handler before a job starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from shelltrain.errors import Interrupted

log = logging.getLogger("shelltrain")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SWEEP_PID_ENV = "SHELLTRAIN_SWEEP_PID"  # the process a process-based sweep (joblib) was started in (sweep_stop.py)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
AGREE_EVERY = 20  # polls between the DDP ranks' agreement on a stop: an all-reduce, which stalls a GPU like a host sync


class GracefulStop:
    """While training, the first SIGINT or SIGTERM asks the engine to stop after the current step (it
    then writes a resumable checkpoint); a second one interrupts at once. Called, it says whether a
    stop was asked for; `signum` is the signal.

    Under DDP every rank must stop after the same step, so the ranks agree every AGREE_EVERY polls (the
    engine polls after every optimizer step, on every rank alike) whether any of them was asked to stop.
    A second signal does not cut a rank short there: torchrun forwards a terminal's Ctrl-C as SIGTERM on
    top of the SIGINT every rank already got, and kills the ranks itself after its own timeout."""

    def __init__(self, run_dir: Path | None = None):
        from shelltrain import distributed  # torch: only once a run trains

        self.distributed = distributed
        self.run_dir = run_dir
        self.agree_every = AGREE_EVERY
        self.signum: int | None = None
        self.requested = False  # a stop was asked for (on any rank, under DDP) and the engine was told
        self._polls = 0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __call__(self) -> bool:
        if not self.distributed.active():
            self.requested = self.signum is not None
        else:
            self._polls += 1
            if self._polls % self.agree_every == 0:
                self.requested = self.distributed.any_rank(self.signum is not None)
        return self.requested

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            # A launcher worker leaves a terminal's Ctrl-C to the sweep's process, which passes one SIGTERM on.
            for signum in (signal.SIGTERM,) if in_launcher_worker() else STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def handle(self, signum: int, frame: Any = None) -> None:
        if os.getpid() != self._pid:
            return  # a forked data-loader worker inherited this handler: the main process decides
        if self.signum is not None:
            if self.distributed.active():
                return
            raise Interrupted(signum, self.run_dir, saved=False)
        self.signum = signum
        name = signal.Signals(signum).name
        if not self.distributed.is_main():
            return  # rank 0 speaks for all
        how = f"{'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again quits at once"
        if self.distributed.active():
            how = "the launcher ends every process after its timeout"
        sys.stderr.write(f"\nshelltrain: {name} received: finishing this step and saving a checkpoint ({how})\n")
        sys.stderr.flush()
        log.info("%s received: stopping after this step", name)


def leave_stop_signals_to_main(init: Any, parent: int, worker_id: int) -> None:
    """In a data-loader worker (and a decode process of a data.cache build): ignore SIGINT and SIGTERM, and die
    with the main process `parent`.

    A terminal's Ctrl-C and a cluster's SIGTERM reach every process of the job; the main process stops
    gracefully and shuts its workers down, which a worker dying of the signal first would turn into a crash.
    Ignoring SIGTERM, a worker must notice by itself when the main process is gone (even SIGKILLed): on Linux
    the kernel sends it SIGKILL then (PR_SET_PDEATHSIG); elsewhere torch's watchdog polls the parent's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != parent:  # the main process died before the line above took effect
        os._exit(1)
    if init is not None:
        init(worker_id)


def exit_on_sigterm() -> Any:
    """Outside training (which stops gracefully), SIGTERM ends the job like Ctrl-C: cleanly, exit 143.
    Returns the previous handler (None off the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Interrupted(signum, None, saved=False)

    return signal.signal(signal.SIGTERM, terminate)


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send `signum` to this process when its parent dies (prctl PR_SET_PDEATHSIG), so
    no worker outlives a killed parent blocked on a pipe to it. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def in_launcher_worker() -> bool:
    """Whether this job runs in a worker process a sweep's launcher started (joblib's loky), not in the sweep's
    own process (the basic launcher) nor as a torchrun rank."""
    sweep_pid = os.environ.get(SWEEP_PID_ENV)
    return sweep_pid not in (None, str(os.getpid())) and int(os.environ.get("WORLD_SIZE", "1")) == 1
