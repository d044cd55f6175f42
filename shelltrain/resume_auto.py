"""trainer.resume=auto: find the run trained with this config; in a resumed sweep, give each job its own run.

A sweep resumed with a subset of its values, or with them in another order, numbers its jobs afresh, so a job's
numbered directory may hold another job's run. Such a job is a guest there (job_records) and leaves it as it was:
it continues its own run where that is, starts a new one in a free numbered directory when it has none, and a run
that already finished is left byte for byte (no record, no log line), with one line saying what was reused.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from shelltrain import job_records, rundir
from shelltrain.checkpoint import peek
from shelltrain.engine import TrainState

log = logging.getLogger("shelltrain")


def find_resumable(root: Path, config: dict[str, Any], prefer: Path | None = None) -> Path | None:
    """The run directory under `root` whose checkpoints/last.pt is the newest among those trained with
    `config` (resolved; trainer.resume aside); `prefer` when it is one of them; None when there is none. The config
    stored in the checkpoint is what counts: .hydra/config.yaml is rewritten when a fixed hydra.run.dir is used
    again."""
    if not root.is_dir():
        return None
    wanted = comparable_config(config)
    found = []
    for last in root.rglob(rundir.LAST):
        if last.parent.name != rundir.CHECKPOINTS or not last.is_file():
            continue
        recorded = (peek(last) or {}).get("config")  # unreadable or foreign: not a match
        if isinstance(recorded, dict) and comparable_config(recorded) == wanted:
            run = last.parent.parent
            if prefer is not None and rundir.normalized(run) == rundir.normalized(prefer):
                return run
            found.append((last.stat().st_mtime, str(run)))
    return Path(max(found)[1]) if found else None


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A composed config minus what may differ between a run and its resumption."""
    config = {k: v for k, v in config.items() if k != "hydra"}
    trainer = dict(config.get("trainer") or {})
    trainer.pop("resume", None)
    config["trainer"] = trainer
    return config


def finished_result(payload: dict[str, Any], cfg: DictConfig, run_dir: Path) -> float | None:
    """The stored result of a run that already finished training and wrote its summary, else None."""
    state = TrainState.from_dict(payload.get("train_state") or {})
    done = state.batch == 0 and (state.epoch >= cfg.trainer.epochs or state.stopped_early)
    try:
        summary = rundir.read_json(rundir.summary(run_dir))
    except (OSError, ValueError):
        return None
    if not done or summary.get("status") != "completed":
        return None
    value = summary.get(f"best_{cfg.trainer.monitor}", summary.get("test_acc"))
    return float(value) if isinstance(value, (int, float)) else math.nan


def settle_sweep_job(cfg: DictConfig, fresh_dir: Path, found: Path | None, root: Path) -> Path:
    """Where a resumed sweep's job runs: the directory of its own run (`found`), else its numbered directory, else
    (that one holds another run) a free numbered one. Returns that directory; this job's Hydra record and log
    follow it, except into a run that already finished, which is left exactly as it was."""
    hydra_cfg = HydraConfig.get()
    job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task) or 'no overrides'})"
    guest = job_records.take(fresh_dir)
    if found is None:
        if guest is None:  # its own numbered directory, new: the job starts there as in any sweep
            _say(f"trainer.resume=auto: {job}: no run of this config under {root}; starting a new run")
            return fresh_dir
        target = _free_job_dir(fresh_dir.parent)
        for name, data in guest.record.items():
            rundir.write_atomic(data, target / rundir.HYDRA / name)
        _follow(guest, target, hydra_cfg)
        _say(
            f"trainer.resume=auto: {job}: no run of this config; '{fresh_dir}' holds another run and stays as it "
            f"was: starting in '{target}'"
        )
        return target
    if guest is None and rundir.normalized(found) != rundir.normalized(fresh_dir):  # a directory made for this job
        job_records.borrow(fresh_dir, {p.name: p.read_bytes() for p in (fresh_dir / rundir.HYDRA).glob("*.yaml")})
        guest = job_records.take(fresh_dir)
        rundir.unlock(fresh_dir)
        rundir.remove_dir(fresh_dir)
    payload = peek(rundir.last_checkpoint(found)) or {}
    if finished_result(payload, cfg, found) is not None:
        _follow(None, found, hydra_cfg)
        _say(f"trainer.resume=auto: {job}: its run in '{found}' already finished; reused as it was")
        return found
    if guest is not None:
        record = found / rundir.next_record(found, "resume")
        for name, data in guest.record.items():
            rundir.write_atomic(data, record / name)
    _follow(guest, found, hydra_cfg)
    _say(f"trainer.resume=auto: {job}: continuing its run in '{found}'")
    return found


def _follow(guest: job_records.Guest | None, target: Path, hydra_cfg: Any) -> None:
    """The job's directory is `target` now; its held-back log goes on there (none for a `guest` of None)."""
    if guest is not None:
        job_records.attach_log(guest, target)
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.runtime.output_dir = str(target)


def _free_job_dir(sweep_dir: Path) -> Path:
    """The first numbered directory of `sweep_dir` after every existing one, made now (two jobs never share it)."""
    numbers = [int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()]
    n = max(numbers, default=-1) + 1
    while True:
        try:
            (sweep_dir / str(n)).mkdir()
            return sweep_dir / str(n)
        except FileExistsError:
            n += 1


def _say(message: str) -> None:
    print(message)
    log.info(message)
