"""The run directory and the sweep directory: every file and folder name, and the one way files are written.

Other modules ask here for a path instead of spelling it, so the layout (a contract users, tests and later
stages rely on) lives in one place. Kept free of torch so the CLI can use it before a job starts.

A run directory::

    .hydra/                 the composed config, Hydra's own config, the overrides
    train.log               the log
    checkpoints/last.pt     the newest state (what a run resumes from)
    checkpoints/best.pt     the model selected by trainer.monitor (the pruned one after pruning)
    checkpoints/unpruned.pt the trained model before pruning
    metrics.csv             one row per epoch (other loggers: metrics.jsonl, tensorboard/)
    summary.json            headline figures and one section per stage
    prune.json, ensemble.json, plots/, members/<i>/, cv/fold_<k>/, error.log

A sweep directory holds one run directory per job (0/, 1/, ...), summary.csv and sweep.png.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from shelltrain.errors import UserError

HYDRA = ".hydra"
OVERRIDES = f"{HYDRA}/overrides.yaml"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
UNPRUNED = "unpruned.pt"
SUMMARY = "summary.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOTS = "plots"
PRUNE_REPORT = "prune.json"
ENSEMBLE_REPORT = "ensemble.json"  # what makes a run directory a reusable ensemble
MEMBERS = "members"  # an ensemble run's trained members, one sub-run each
CV = "cv"  # cross-validation folds, one sub-run each
ERROR_LOG = "error.log"  # a failed sweep job's traceback
SWEEP_SUMMARY = "summary.csv"
SWEEP_PLOT = "sweep.png"  # the score against each swept parameter
SWEEP_RECORD = "multirun.yaml"  # what Hydra writes into a sweep dir it launches: the mark of a sweep dir

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def checkpoint(run_dir: Path, name: str = LAST) -> Path:
    return Path(run_dir) / CHECKPOINTS / name


def last_checkpoint(run_dir: Path) -> Path:
    """What a run directory resumes from."""
    return checkpoint(run_dir, LAST)


def best_checkpoint(run_dir: Path) -> Path:
    """The model a finished run stands for."""
    return checkpoint(run_dir, BEST)


def epoch_checkpoint(run_dir: Path, epoch: int) -> Path:
    """One of the best epochs trainer.keep_checkpoints keeps."""
    return checkpoint(run_dir, f"epoch_{epoch:03d}.pt")


def epoch_checkpoints(run_dir: Path) -> dict[int, Path]:
    """The kept epoch checkpoints of a run, by epoch."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINTS).glob("epoch_*.pt"):
        number = path.stem.removeprefix("epoch_")
        if number.isdigit():
            found[int(number)] = path
    return found


def summary(run_dir: Path) -> Path:
    return Path(run_dir) / SUMMARY


def member_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / MEMBERS / str(index)


def fold_dir(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / CV / f"fold_{fold}"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `trainer.resume=<run_dir>` has something to continue from."""
    return last_checkpoint(run_dir).is_file() or is_ensemble_run(run_dir)


def ensemble_dir(source: Any) -> Path | None:
    """The ensemble run directory `source` (model.weights, an ensemble.checkpoints entry) names: the directory
    or its ensemble.json; else None."""
    if source is None or str(source).strip() == "":
        return None
    path = Path(os.path.expanduser(str(source)))
    if path.name == ENSEMBLE_REPORT and path.is_file():
        return path.parent
    return path if (path / ENSEMBLE_REPORT).is_file() else None


def is_ensemble_run(path: Path) -> bool:
    """An ensemble's run directory with a trained member to continue: its members/<i> sub-runs hold the
    checkpoints, it has none of its own."""
    path = Path(path)
    return not last_checkpoint(path).exists() and any(path.glob(f"{MEMBERS}/*/{CHECKPOINTS}/{LAST}"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(data: Any, path: Path) -> None:
    """JSON, atomically; tensors and numpy scalars become numbers, anything else unknown a string."""
    write_atomic((json.dumps(data, indent=2, default=_json_default) + "\n").encode(), path)


def write_text(text: str, path: Path) -> None:
    write_atomic(text.encode(), path)


def write_atomic(data: bytes, path: Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash never leaves half a file, and a
    failed write (a full disk) leaves the previous file as it was and raises UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(tmp, data)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write '{path}': {disk_error(exc, path.parent)}") from exc


def _write_durably(tmp: Path, data: bytes) -> None:
    """The one place bytes hit the disk (tests replace it to simulate a full disk)."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def disk_error(exc: OSError, where: Path) -> str:
    """What went wrong writing under `where` and what to do about it, for one line."""
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL:
        return (
            f"{reason} (the disk holding '{where}' is full); free some space or write elsewhere with "
            "hydra.run.dir=DIR; earlier checkpoints are untouched"
        )
    if exc.errno in NOT_WRITABLE:
        return f"{reason}; make '{where}' writable or write elsewhere with hydra.run.dir=DIR"
    return f"{reason}; earlier checkpoints are untouched"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def remove_if_unused(run_dir: Path) -> None:
    """Drop a run dir that holds only what Hydra wrote at start-up, so failed starts leave no litter.

    A dir with checkpoints or a summary holds results (a resumed run) and is never touched.
    """
    if not run_dir.is_dir():
        return
    produced = [
        p for p in run_dir.iterdir() if p.name not in (HYDRA, LOG) and not (p.is_dir() and not any(p.iterdir()))
    ]  # an empty checkpoints/ (the first write failed) holds nothing either
    if not produced:
        remove_dir(run_dir)


def remove_dir(run_dir: Path) -> None:
    """Remove a run dir, then the folders above it that it leaves empty (outputs/DATE/ of the default
    layout), going no higher than the directory the command was started in."""
    shutil.rmtree(run_dir, ignore_errors=True)
    top = Path.cwd().absolute()
    parent = run_dir.absolute().parent
    while parent != top and parent.is_relative_to(top):
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break
        parent = parent.parent
