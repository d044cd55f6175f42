"""What a job found in the directories that already held records, so that it leaves them as it found them.

A refused job (a resume that does not fit, a predict pointed at a run directory) takes its own Hydra record and its
log lines out of a directory that held another job's records (`note`, `leave_as_found`); it never touches what was
there before. A resumed sweep's job whose numbered directory held a run is only a guest there until it knows which
run is its own (`borrow`, `take`): its Hydra record and its log are held back, and nothing records a failure there.
Kept free of torch and of rundir (which calls it from its Hydra callback).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from shelltrain.locks import LOCK, normalized

log = logging.getLogger("shelltrain")


@dataclass
class Found:
    """A directory as a job found it: its files (size, modification time) but for the lock, the log and the job's
    own record, the size of its log, and the record the job put there."""

    files: dict[str, tuple[int, int]]
    log: Path
    log_size: int
    record: Path | None


@dataclass
class Guest:
    """A resumed sweep job in a numbered directory that held another run: the Hydra record it would have left there
    and its log handlers, held back until the job knows where its run is."""

    record: dict[str, bytes]
    handlers: list[tuple[logging.Logger, logging.Formatter | None, int, str]] = field(default_factory=list)


_found: dict[Path, Found] = {}
_guests: dict[Path, Guest] = {}


def note(directory: Path, record: Path | None, log_file: Path) -> None:
    """Remember `directory` as it is now, before this job writes its `record` (a folder) and log lines there."""
    directory = normalized(directory)
    if directory not in _found:
        size = log_file.stat().st_size if log_file.is_file() else -1
        _found[directory] = Found(_files(directory, record, log_file), normalized(log_file), size, record)


def _files(directory: Path, record: Path | None, log_file: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file in `directory` but its lock, its log and the job's record."""
    skip = {normalized(log_file), directory / LOCK}
    files = {}
    for path in directory.rglob("*"):
        inside_record = record is not None and normalized(path).is_relative_to(normalized(record))
        if path.is_file() and normalized(path) not in skip and not inside_record:
            stat = path.stat()
            files[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns)
    return files


def leave_as_found() -> None:
    """A refused job: every directory it found holding records loses this job's record and log lines again, unless
    the job changed something else there (then they stay, as the account of that change)."""
    for directory, found in list(_found.items()):
        if _files(directory, found.record, found.log) != found.files:
            log.info("%s changed while this job ran: its record there stays", directory)
            continue
        if found.record is not None:
            shutil.rmtree(found.record, ignore_errors=True)
        if found.log_size < 0:
            found.log.unlink(missing_ok=True)
        elif found.log.is_file() and found.log.stat().st_size > found.log_size:
            os.truncate(found.log, found.log_size)
    _found.clear()


def borrow(directory: Path, record: dict[str, bytes]) -> None:
    """A resumed sweep job starts in `directory`, which holds another run: hold back its Hydra `record` and its log
    (Hydra opened it there) until `take` says where the job's run is."""
    directory = normalized(directory)
    guest = Guest(record)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and normalized(handler.baseFilename).parent == directory:
                guest.handlers.append((logger, handler.formatter, handler.level, Path(handler.baseFilename).name))
                logger.removeHandler(handler)
                handler.close()
    _guests[directory] = guest


def borrowed(directory: Path) -> bool:
    """Whether this job is a guest in `directory`: it holds another run, on which nothing of this job is recorded."""
    return normalized(directory) in _guests


def take(directory: Path) -> Guest | None:
    """The job knows where its run is: what it held back in `directory` (None when it was no guest there)."""
    return _guests.pop(normalized(directory), None)


def attach_log(guest: Guest, directory: Path) -> None:
    """The log a guest held back goes on in `directory`'s log file."""
    for logger, formatter, level, name in guest.handlers:
        handler = logging.FileHandler(Path(directory) / name, mode="a")
        handler.setFormatter(formatter)
        handler.setLevel(level)
        logger.addHandler(handler)


def forget() -> None:
    """A job ended: what it noted about the directories it found is of no use to the next one."""
    _found.clear()
    _guests.clear()
