"""One writer per directory: a run or sweep directory is held by the one shelltrain process writing into it, and
every spelling of a directory (`runs/../runs/X`, a symbolic link) is the same directory. Kept free of torch and of
rundir (which re-exports these names), so that both the CLI and the Hydra callbacks can take a lock first.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from shelltrain.errors import UserError

LOCK = ".shelltrain.lock"  # one writer per run or sweep directory (`lock`)
LOCKS_HELD_ENV = "SHELLTRAIN_LOCKS_HELD"  # directories this process's parent holds locked for it (torchrun ranks)


def free_dir(path: Path, label: str) -> Path:
    """A directory beside `path` that holds nothing yet, named after what goes into it (`<path>-<label>`)."""
    path = Path(path)
    candidate, n = path.with_name(f"{path.name}-{label}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{label}-{n}")
    return candidate


def normalized(directory: Path | str) -> Path:
    """One spelling per directory (absolute, `..` and symbolic links resolved): `runs/../runs/X` and `runs/X` are
    one directory, whose lock this process must recognise as its own."""
    return Path(os.path.realpath(Path(directory).expanduser()))


_held: dict[Path, tuple[Any, str]] = {}  # directory -> (its FileLock, "run" | "sweep")


def lock(directory: Path, key: str = "hydra.run.dir", kind: str = "run") -> None:
    """Hold `directory` for this process until `unlock` (or its exit): a second shelltrain process pointed at it
    is refused at once, its one line naming the holder. The lock is an flock (filelock) on `.shelltrain.lock`,
    which the kernel releases when its holder dies; the file then still names the dead holder, which a note
    reports when the lock is taken over. A no-op where this process, or the parent that started it (a
    `trainer.devices` launch), holds it already."""
    from filelock import FileLock, Timeout

    directory = normalized(directory)
    if directory in _held or held_by_parent(directory):
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    held = FileLock(path, thread_local=False)
    try:
        held.acquire(timeout=0)
    except Timeout:
        raise UserError(
            f"{key} '{directory}' is in use by another shelltrain process ({_holder(path) or 'holder unknown'}); "
            f"wait for it to end, or choose a free directory, e.g. {key}={free_dir(directory, 'new')}"
        ) from None
    stale = _holder(path)
    if stale:  # the previous holder never released it: it died (or was killed) while writing here
        sys.stderr.write(
            f"shelltrain: note: took over the lock of '{directory}' from a process that is gone ({stale})\n"
        )
    # Written in place, not by write_atomic: a rename would swap the inode the flock is on.
    path.write_text(f"PID {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    _held[directory] = (held, kind)
    os.environ[LOCKS_HELD_ENV] = os.pathsep.join(str(d) for d in _held)


def held_by_parent(directory: Path) -> bool:
    """Whether the process that started this one (a `trainer.devices` launch) holds `directory`: this process
    then continues that job there."""
    return str(normalized(directory)) in os.environ.get(LOCKS_HELD_ENV, "").split(os.pathsep)


def unlock(directory: Path) -> None:
    """Let go of `directory`: the lock file is emptied first, so only a holder that died leaves its name there."""
    directory = normalized(directory)
    held, _ = _held.pop(directory, (None, None))
    os.environ[LOCKS_HELD_ENV] = os.pathsep.join(str(d) for d in _held)
    if held is None:
        return
    with contextlib.suppress(OSError):  # the directory was removed (a failed start): nothing left to empty
        (directory / LOCK).write_text("")
    held.release()


def unlock_runs() -> None:
    """Let go of every run directory this process holds (a job ended); a sweep directory stays held."""
    for directory, (_, kind) in list(_held.items()):
        if kind == "run":
            unlock(directory)


def _holder(path: Path) -> str:
    """Who holds (or held) the lock file at `path`, as its holder wrote it; "" when nobody wrote one."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def held_by_another(directory: Path) -> bool:
    """Whether another shelltrain process holds `directory` now (asked without keeping its lock)."""
    from filelock import FileLock, Timeout

    directory = normalized(directory)
    path = directory / LOCK
    if directory in _held or held_by_parent(directory) or not path.is_file():
        return False
    probe = FileLock(path, thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False
