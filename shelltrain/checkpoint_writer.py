"""Checkpoint files written in the background while training goes on, one epoch's files at a time.

An epoch-end checkpoint is a snapshot (its bytes, serialized by the training thread: checkpoint.serialize)
handed to one writer thread: the next epoch trains while the bytes go to disk and are fsynced. Every file still goes
through the atomic write (temporary file, fsync, rename, folder fsync), so a crash leaves each file whole: the old
version or the new one.
What a crash can lose is the checkpoint still being written (the previous epoch's stays in place). best.pt and
kept epoch files are hard links to last.pt's bytes when they hold the same checkpoint: one file written and
fsynced per epoch, not two.
"""

from __future__ import annotations

import threading
from pathlib import Path

from shelltrain.rundir import FileBytes, byte_count, link_atomic, write_atomic


class CheckpointWriter:
    """One background thread writing (bytes, path) pairs in order; `wait` returns when they are on disk and
    raises the error a write hit (a full disk: a UserError naming the file, earlier files untouched)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.bytes_written = 0  # checkpoint bytes this run wrote (hard links count nothing)

    def submit(self, files: list[tuple[FileBytes | Path, Path]]) -> None:
        """Write each (data, path) in order after what is pending; data given as a path (a file written earlier in
        the same list) makes `path` a hard link to it, or a copy where the file system has none."""
        self.wait()
        # Not a daemon: the interpreter waits for it at exit, so a run ending by an exception still gets its file.
        self._thread = threading.Thread(target=self._run, args=(files,), name="shelltrain-checkpoint", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until every submitted file is written; raise the first write's error, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, files: list[tuple[FileBytes | Path, Path]]) -> None:
        try:
            self._write(files)
        except BaseException as exc:  # handed to the training thread at its next wait
            self._error = exc

    def _write(self, files: list[tuple[FileBytes | Path, Path]]) -> None:
        written: dict[Path, FileBytes] = {}
        for data, path in files:
            if isinstance(data, Path):
                if link_atomic(data, path):
                    continue
                data = written[data]
            write_atomic(data, path)
            written[path] = data
            self.bytes_written += byte_count(data)
