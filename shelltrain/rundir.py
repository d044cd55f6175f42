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
    compress.json, compress/<stage>/  the compression pipeline's table and its stages' sub-runs
    .shelltrain.lock        held by the one process writing into the directory (PID, host, start time)

A sweep directory holds one run directory per job (0/, 1/, ...), summary.csv, sweep.png and its own lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from shelltrain import job_records, locks
from shelltrain.errors import EXIT_USER_ERROR, UserError
from shelltrain.locks import LOCK, free_dir, held_by_another, held_by_parent, lock, normalized, unlock
from shelltrain.locks import LOCKS_HELD_ENV as LOCKS_HELD_ENV  # the lock's names and calls live in locks.py

HYDRA = ".hydra"
OVERRIDES = f"{HYDRA}/overrides.yaml"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
EMA = "ema.pt"  # trainer.ema: the averaged weights of the selected epoch, as a model of their own
SWA = "swa.pt"  # trainer.swa: the average with its BatchNorm statistics recomputed
UNPRUNED = "unpruned.pt"
SUMMARY = "summary.json"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
WANDB_RUN_ID = "wandb_run_id"  # logger=wandb: likewise
MLFLOW_RUN_ID = "mlflow_run_id"  # logger=mlflow: the MLflow run this run dir logs to (a resume continues it)
PLOTS = "plots"
PRUNE_REPORT = "prune.json"
REPORT_PAGE = "report.html"  # report.html: a run's (or, beside summary.csv, a sweep's) page, one file, no network
MODEL_CARD = "MODEL_CARD.md"  # report.model_card: the run described for people and the Hugging Face hub
PREDICTIONS = "predictions.csv"  # one row per tested image (the test step, task=evaluate; task=predict's own columns)
AUDIT_REPORT = "audit.json"  # task=audit: every duplicate pair, file problem and ranked label issue
AUDIT_LABELS_PLOT = "audit_label_issues.png"  # under plots/: task=audit's top label-issue candidates
AUDIT_PAIRS_PLOT = "audit_duplicates.png"  # under plots/: task=audit's duplicate pairs, leaks first
CURVES_PLOT = "curves.png"  # under plots/: loss, accuracy and learning rate per epoch
CONFUSION_PLOT = "confusion_matrix.png"  # under plots/: the tested images per (true, predicted) class
TOP_LOSSES_PLOT = "top_losses.png"  # under plots/: the tested images with the highest loss
PER_CLASS_PLOT = "per_class.png"  # under plots/: precision and recall per class
LR_FIND = "lr_find.json"  # task=lr_find: the LR ramp's losses and the suggested optimizer.lr
PROFILE_TRACE = "profile_trace.json"  # trainer.profile: torch.profiler's chrome trace (Perfetto, TensorBoard)
ENSEMBLE_REPORT = "ensemble.json"  # what makes a run directory a reusable ensemble
MEMBERS = "members"  # an ensemble run's trained members, one sub-run each
CV = "cv"  # cross-validation folds, one sub-run each
COMPRESS = "compress"  # the compression pipeline's stages (teacher, student, ...), one sub-run each
COMPRESS_REPORT = "compress.json"  # its table: one row per model
COMPRESS_PLOT = "compress.png"  # under plots/: test accuracy against parameters and CPU latency
ERROR_LOG = "error.log"  # a failed sweep job's traceback
SWEEP_SUMMARY = "summary.csv"
SWEEP_PLOT = "sweep.png"  # the score against each swept parameter
SWEEP_CONFIG = "multirun.yaml"  # Hydra's record of a sweep
SWEEP_STOP = ".shelltrain.stop"  # in a sweep dir: one line per signal the sweep's process had (sweep_stop.SweepStop)
RECORDS = (HYDRA, LOG, SUMMARY, CHECKPOINTS, METRICS_CSV)  # what shows that a job has written into a directory

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# Failures to make or write files in a chosen place (a run, sweep or cache folder): where the output goes, not a bug.
PLACE_ERRNOS = frozenset({*DISK_FULL, *NOT_WRITABLE, errno.ENOTDIR, errno.EEXIST, errno.EISDIR})


def checkpoint(run_dir: Path, name: str = LAST) -> Path:
    return Path(run_dir) / CHECKPOINTS / name


def last_checkpoint(run_dir: Path) -> Path:
    """What a run directory resumes from."""
    return checkpoint(run_dir, LAST)


def best_checkpoint(run_dir: Path) -> Path:
    """The model a finished run stands for."""
    return checkpoint(run_dir, BEST)


def weights_checkpoint(run_dir: Path, weights: str) -> Path:
    """The checkpoint of one of a run's weights: best, last, ema or swa (`model.weights=RUN@ema`)."""
    return checkpoint(run_dir, {"best": BEST, "last": LAST, "ema": EMA, "swa": SWA}[weights])


def exported_state_dict(run_dir: Path, name: str) -> Path:
    """checkpoint.export_state_dict's plain state dict, beside the run's checkpoints."""
    return checkpoint(run_dir, name)


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


def lr_find_report(run_dir: Path) -> Path:
    return Path(run_dir) / LR_FIND


def lr_find_plot(run_dir: Path) -> Path:
    return Path(run_dir) / PLOTS / "lr_find.png"


def profile_trace(run_dir: Path) -> Path:
    return Path(run_dir) / PROFILE_TRACE


def member_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / MEMBERS / str(index)


def compress_stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / COMPRESS / stage


def compress_report(run_dir: Path) -> Path:
    return Path(run_dir) / COMPRESS_REPORT


def fold_dir(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / CV / f"fold_{fold}"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `trainer.resume=<run_dir>` has something to continue from."""
    return last_checkpoint(run_dir).is_file() or is_ensemble_run(run_dir) or is_compress_run(run_dir)


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


def is_compress_run(path: Path) -> bool:
    """A compression chain's run directory with a stage to continue: its compress/<stage>/ sub-runs (an ensemble's
    members among them) hold the checkpoints, it has none of its own."""
    stages = Path(path) / COMPRESS
    return not last_checkpoint(path).exists() and (
        any(stages.glob(f"*/{CHECKPOINTS}/{LAST}")) or any(stages.glob(f"*/{MEMBERS}/*/{CHECKPOINTS}/{LAST}"))
    )


def holds_records(path: Path) -> bool:
    """Whether `path` holds a job's records (a run, an evaluation, a sweep job): no other job writes over them."""
    return any((Path(path) / name).exists() for name in RECORDS)


def next_record(run_dir: Path, label: str) -> str:
    """`.hydra/<label>-<n>`, the first free one: where a later job in `run_dir` (a resume) keeps its own Hydra
    record, beside the original `.hydra/` files."""
    n = 1
    while (Path(run_dir) / HYDRA / f"{label}-{n}").exists():
        n += 1
    return f"{HYDRA}/{label}-{n}"


def in_use(hydra_cfg: Any) -> bool:
    """Whether this job started in a directory that already held another job's records (KeepRecords then put
    this job's Hydra record into a `.hydra/<label>-<n>/` folder of its own)."""
    subdir = hydra_cfg.get("output_subdir")
    return subdir is not None and str(subdir).startswith(f"{HYDRA}/")


def refuse_in_use(hydra_cfg: Any, message: str) -> None:
    """Refuse a job that would write over the records of the directory it was pointed at: its own Hydra record
    (`.hydra/<label>-<n>/`) goes, so the directory is left exactly as it was; `message` is the one line."""
    if in_use(hydra_cfg):
        shutil.rmtree(Path(str(hydra_cfg.runtime.output_dir)) / str(hydra_cfg.output_subdir), ignore_errors=True)
    raise UserError(message)


class KeepRecords(Callback):
    """Hydra callback: no job writes over another job's records.

    Hydra saves a job's `.hydra/` record (config.yaml, hydra.yaml, overrides.yaml) into hydra.run.dir before any
    of shelltrain's code runs, so where it goes is decided here, before Hydra's `run_job`: into a directory that
    already holds records, a job's record goes to `.hydra/<label>-<n>/` and the original files stay as they were
    (the CLI then refuses the job unless it resumes that run). A sweep cannot be told per job; re-running into
    a sweep directory that holds jobs is refused before Hydra writes anything, unless it resumes them
    (trainer.resume=auto): a resumed job's numbered directory gets its original record back at once and the job
    is a guest there until resuming finds its own run (resume_auto). A run inside a directory another process
    holds (a running sweep) is refused.
    """

    def __init__(self) -> None:
        self.kept: dict[Path, dict[str, bytes]] = {}

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        run_dir = Path(str(hydra.run.dir))
        continued = held_by_parent(run_dir)  # asked before this process takes the lock (and names it there too)
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 holds the lock for every rank
            existed = run_dir.exists()
            _lock_or_exit(run_dir, "hydra.run.dir", "run")
            if not continued:
                _refuse_inside_held(run_dir, existed)
        if hydra.output_subdir is None or continued or not holds_records(run_dir):
            return  # a trainer.devices process continues its parent's job: the records are that job's own
        label = "resume" if config.trainer.resume is not None else str(config.task)
        record = next_record(run_dir, label)
        job_records.note(run_dir, run_dir / record, run_dir / LOG)  # a refused job leaves it as it was
        with read_write(hydra), open_dict(hydra):
            hydra.output_subdir = record

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        _lock_or_exit(sweep_dir, "hydra.sweep.dir", "sweep")  # held by this process for the whole sweep
        jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and _taken(d)] if sweep_dir.is_dir() else []
        if jobs and str(config.trainer.resume) != "auto":
            unlock(sweep_dir)  # refused: the directory is left as it was, its lock file free again
            _exit_with(
                f"hydra.sweep.dir '{sweep_dir}' already holds a sweep ({len(jobs)} job(s)); "
                "continue it with the same overrides plus trainer.resume=auto, or choose a new hydra.sweep.dir, "
                f"e.g. hydra.sweep.dir={free_dir(sweep_dir, 'new')}"
            )
        self.kept = {
            normalized(d): {p.name: p.read_bytes() for p in (d / HYDRA).glob("*") if p.is_file()} for d in jobs
        }

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A resumed sweep job whose directory held a run: the original record goes back at once, and the job is a
        guest there (job_records.borrow) until resuming finds which run is its own."""
        job_dir = normalized(str(config.hydra.runtime.output_dir))
        kept = self.kept.pop(job_dir, None)
        if kept is None:
            return
        written = {p.name: p.read_bytes() for p in (job_dir / HYDRA).glob("*") if p.is_file()}
        for name in written.keys() - kept.keys():
            (job_dir / HYDRA / name).unlink()
        for name, original in kept.items():
            if written.get(name) != original:
                write_atomic(original, job_dir / HYDRA / name)
        job_records.borrow(job_dir, written)


def _taken(directory: Path) -> bool:
    """Whether a sweep's numbered directory is another job's: it holds records, or a process is writing there."""
    return holds_records(directory) or held_by_another(directory)


def _refuse_inside_held(run_dir: Path, existed: bool) -> None:
    """A run directory inside one another process is writing (a running sweep, whose job would write over it) is
    refused; the directory this job created for itself goes again."""
    holder = next((p for p in normalized(run_dir).parents if held_by_another(p)), None)
    if holder is None:
        return
    unlock(run_dir)
    if not existed:
        remove_dir(normalized(run_dir))
    _exit_with(
        f"hydra.run.dir '{run_dir}' lies inside '{holder}', which another shelltrain process is writing (a sweep's "
        f"jobs go there); choose a directory outside it, e.g. hydra.run.dir={free_dir(holder, 'run')}"
    )


def _lock_or_exit(directory: Path, key: str, kind: str) -> None:
    """`lock` from a Hydra callback, before Hydra writes anything into the directory; a refusal leaves the
    holder's files as they were."""
    try:
        lock(directory, key, kind)
    except UserError as exc:
        _exit_with(str(exc))
    except OSError as exc:  # the directory cannot be made or written (a read-only place, a missing mount)
        _exit_with(place_error(exc, directory if directory.is_dir() else None))


def place_error(exc: OSError, where: Path | None = None) -> str:
    """The one line for a run or sweep directory that cannot be made or written: `where` (default: the file the
    error names), why, and the keys that choose another place."""
    named = f"'{where or exc.filename}'" if (where or exc.filename) else "the run directory"
    return (
        f"cannot create or write {named}: {exc.strerror or exc}; choose a writable place for the run directory "
        "with hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m)"
    )


def _exit_with(message: str) -> None:
    """A refusal from a Hydra callback: Hydra turns a callback's exception into a warning and goes on, so the
    one line is printed and the command ends here."""
    sys.stderr.write(f"shelltrain: error: {message}\n")
    raise SystemExit(EXIT_USER_ERROR)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(data: Any, path: Path) -> None:
    """JSON, atomically; tensors and numpy scalars become numbers, anything else unknown a string. NaN and
    infinities are not JSON: they become null, and a top-level dict lists their keys under "non_finite"."""
    plain = json.loads(json.dumps(data, default=_json_default))  # tensors and the like as plain values
    non_finite: list[str] = []
    plain = _finite(plain, "", non_finite)
    if non_finite and isinstance(plain, dict):
        plain["non_finite"] = sorted(set(plain.get("non_finite") or []) | set(non_finite))
    write_atomic((json.dumps(plain, indent=2, allow_nan=False) + "\n").encode(), path)


def _finite(value: Any, key: str, non_finite: list[str]) -> Any:
    """`value` with every NaN or infinite float replaced by None, its dotted key appended to `non_finite`."""
    if isinstance(value, float) and not math.isfinite(value):
        non_finite.append(key)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{key}.{k}" if key else str(k), non_finite) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v, f"{key}[{i}]", non_finite) for i, v in enumerate(value)]
    return value


def write_text(text: str, path: Path) -> None:
    write_atomic(text.encode(), path)


FileBytes = bytes | list[bytes]  # a file's contents for write_atomic: one buffer, or pieces in order (checkpoints)


def pieces(data: FileBytes) -> list[bytes]:
    """A file's contents as its pieces in order (one buffer is one piece)."""
    return [data] if isinstance(data, bytes) else data


def byte_count(data: FileBytes) -> int:
    return sum(len(piece) for piece in pieces(data))


def write_atomic(data: FileBytes, path: Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash never leaves half a file, and a
    failed write (a full disk) leaves the previous file as it was and raises UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # two writers never share one
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(tmp, data)
        _rename_durably(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write '{path}': {disk_error(exc, path.parent)}") from exc


def link_atomic(source: Path, path: Path) -> bool:
    """Make `path` a second name of the (complete, fsynced) file `source`: a hard link under a temporary name,
    renamed over `path`, so a crash leaves the old `path` or the new one, and no byte is written twice. False
    where the file system has no hard links (the caller writes the bytes instead)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        _rename_durably(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write '{path}': {disk_error(exc, path.parent)}") from exc
    return True


def _rename_durably(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path`, then fsync the folder: the rename itself survives a power loss."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_durably(tmp: Path, data: FileBytes) -> None:
    """The one place bytes hit the disk (tests replace it to simulate a full disk)."""
    with open(tmp, "wb") as f:
        f.writelines(pieces(data))
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
    """Drop a run dir that holds only what Hydra wrote at start-up, so failed starts leave no litter; a directory
    that held records when the job found it gets back as it was (job_records.leave_as_found).

    A dir with checkpoints or a summary holds results (a resumed run) and is never touched.
    """
    job_records.leave_as_found()
    if not run_dir.is_dir():
        return
    produced = [
        p for p in run_dir.iterdir() if p.name not in (HYDRA, LOG, LOCK) and not (p.is_dir() and not any(p.iterdir()))
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


def unlock_runs() -> None:
    """A job ended: let go of every run directory this process holds (a sweep directory stays held) and of what
    the job noted about the directories it found."""
    locks.unlock_runs()
    job_records.forget()


def stop_marker(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / SWEEP_STOP


def append_stop(marker: Path, name: str) -> None:
    """One more signal for the sweep's jobs. Appended in place (a signal handler; the jobs only count lines)."""
    with open(marker, "a") as f:
        f.write(name + "\n")


def clear_stop_marker(marker: Path) -> None:
    """A sweep that starts (or resumes) forgets the signals that stopped it before."""
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
