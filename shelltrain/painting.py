"""Where a run's pictures are drawn: in processes beside the run, so that they cost its end little.

A run's pictures (curves, confusion matrix, top-loss gallery, per-class chart) take about a second to draw on a
small machine: matplotlib's import (~0.3 s) and 0.1-0.3 s a picture, all after training, when the user is waiting
for the run to end. A `Painter` starts its processes when the job starts (they import matplotlib while the run
imports torch, when a core is idle) and hands each picture to one as soon as its figures exist,
while the run goes on testing and writing its report. `wait` returns when every picture is on disk.

A picture a process could not draw (its function raised, or the process died) is drawn again here, so a failure
is raised where it would have been without the processes, with its own traceback. The processes are plain
interpreters started for this (not forks of the run, nor `multiprocessing`'s spawn, which would re-run the
script that started the run); they ignore Ctrl-C and SIGTERM (the run stops them) and die with the run, even a
SIGKILLed one. The pictures' functions (shelltrain.plots) take plain data (lists, dicts, NumPy arrays), never
tensors: the processes import matplotlib and NumPy, not torch.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from shelltrain.signals import leave_stop_signals_to_main

PROCESSES = 1  # one process: two took longer to start and drew no sooner (each warms up its own matplotlib)
STOP_SECONDS = 10  # at the end, how long an idle process may take to exit before it is killed

Request = tuple[Callable[..., Any], tuple[Any, ...]]  # a picture's function and its arguments

# the process's command: the run's import path (as multiprocessing passes it), then the server
_SERVE = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from shelltrain.painting import serve; serve()"


class Painter:
    """Draws pictures in `processes` painting processes, round-robin (0: here, at once, as plain calls)."""

    def __init__(self, processes: int = PROCESSES) -> None:
        self._processes = [_Process() for _ in range(processes)]
        self._turn = 0

    def draw(self, picture: Callable[..., Any], *args: Any) -> None:
        """`picture(*args)`, in a painting process when there is one."""
        if not self._processes:
            picture(*args)
            return
        self._processes[self._turn % len(self._processes)].ask(picture, args)
        self._turn += 1

    def wait(self) -> None:
        """Every picture asked for is on disk; one a process did not draw is drawn here (raising its failure)."""
        for process in self._processes:
            for picture, args in process.undrawn():
                picture(*args)

    def close(self) -> None:
        """End the processes (a run that failed before `wait` does not wait for its pictures)."""
        for process in self._processes:
            process.stop()


_started: Painter | None = None  # the painter of the outermost `painting` block running


@contextmanager
def painting(enabled: bool, processes: int = PROCESSES) -> Iterator[Painter | None]:
    """A Painter for the block when `enabled` (the config's `plots`), else None; its processes end with the block.
    A block inside another shares the outer one's painter: the CLI starts one for the job before torch loads (its
    processes then import matplotlib on the core torch's import leaves idle), and every run of the job (ensemble
    members, folds, stages) draws with it."""
    global _started
    if not enabled or _started is not None:
        yield _started if enabled else None
        return
    _started = Painter(processes)
    try:
        yield _started
    finally:
        painter, _started = _started, None
        painter.close()


class _Process:
    """One painting process. Requests go to its stdin through a writer thread (the run never waits for a busy
    process to read a large gallery); it answers each with whether it drew it, read when the run waits."""

    def __init__(self) -> None:
        command = [sys.executable, "-c", _SERVE, json.dumps(sys.path), str(os.getpid())]
        self._popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._asked: list[Request] = []
        self._requests: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="shelltrain-painter", daemon=True)
        self._writer.start()

    def ask(self, picture: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._asked.append((picture, args))
        self._requests.put((picture, args))

    def undrawn(self) -> list[Request]:
        """The requests asked so far that the process did not draw, once it answered for the others."""
        asked, self._asked = self._asked, []
        return [request for request in asked if not _answer(self._popen.stdout)]

    def stop(self) -> None:
        """End the process: at once where pictures are still asked for (the run failed before waiting for them),
        else once it read the end of its requests."""
        if self._asked:
            self._popen.kill()
        self._requests.put(None)
        self._writer.join()
        try:
            self._popen.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()
        self._popen.stdout.close()

    def _write(self) -> None:
        """Pickle each request to the process, then close its stdin (its signal to exit)."""
        stdin = self._popen.stdin
        try:
            while (request := self._requests.get()) is not None:
                pickle.dump(request, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                stdin.flush()
        except OSError:  # the process died (a broken pipe): its missing answers make the run draw those here
            return
        finally:
            _close_quietly(stdin)


def _answer(replies: BinaryIO) -> bool:
    """The process's answer to its next request: whether it drew it (False where it died first)."""
    try:
        return bool(pickle.load(replies))
    except (EOFError, OSError, pickle.UnpicklingError):
        return False


def _close_quietly(stream: BinaryIO) -> None:
    """Close our end of a pipe whose other end may be gone (a dead process: nothing to tell it)."""
    try:
        stream.close()
    except BrokenPipeError:
        return


def serve() -> None:
    """A painting process: import matplotlib, then draw each request from stdin until it closes, answering each
    on the original stdout (a picture that prints writes to stderr, not into the answers)."""
    leave_stop_signals_to_main(None, int(sys.argv[2]), 0)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import matplotlib.figure  # noqa: F401  the first picture's wait, taken while the run starts
    from matplotlib.backends import backend_agg  # noqa: F401

    requests = sys.stdin.buffer
    while True:
        try:
            picture, args = pickle.load(requests)
        except EOFError:
            return
        try:
            picture(*args)
            drawn = True
        except Exception:  # drawn again in the run, which raises it there with its traceback
            drawn = False
        pickle.dump(drawn, replies)
        replies.flush()
