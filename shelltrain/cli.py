"""The `shelltrain` command: Hydra composes the config, the runner does the work.

Kept free of torch imports so that `--help`, `--version` and `--cfg job` answer in a fraction of a second;
resuming, the runner and the process launcher import it once a job really runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from shelltrain import job_records, launch, rundir, signals, summary, sweep, sweep_stop
from shelltrain.compare import check_baseline_run, with_baseline
from shelltrain.cores import affinity_cores
from shelltrain.errors import EXIT_USER_ERROR, GateMissed, Interrupted, UserError
from shelltrain.explain import explain
from shelltrain.gates import active, check
from shelltrain.host_memory import cache_freed_memory
from shelltrain.painting import painting
from shelltrain.schema import validate
from shelltrain.signals import exit_on_sigterm

# Exit codes (README "Using shelltrain in CI"): 0 success; 1 an unexpected error (traceback); 2 a config or
# input mistake (errors.EXIT_USER_ERROR); 3 a quality gate missed, 4 one or more jobs of a multirun failed (sweep).
log = logging.getLogger("shelltrain")


@hydra.main(version_base="1.3", config_path="pkg://shelltrain.configs", config_name="train")
def _task(cfg: DictConfig) -> Any:
    hydra_cfg = HydraConfig.get()
    fresh_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.perf_counter()
    previous = exit_on_sigterm()
    worker = multirun and signals.in_launcher_worker()
    job_done = sweep_stop.start_launcher_job(Path(hydra_cfg.sweep.dir)) if worker else None
    try:
        if worker and rundir.stop_marker(Path(hydra_cfg.sweep.dir)).is_file():
            raise Interrupted(signal.SIGTERM, None, saved=False)  # the sweep stopped before this job started
        result, missed = run_job(cfg, fresh_dir)
    except KeyboardInterrupt as exc:
        if worker:  # the sweep's process reports; the job records its state and returns to the launcher
            _record_interrupt(_job_dir(), getattr(exc, "signum", signal.SIGINT), started)
            return None
        stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT, None, saved=False)
        if not launch.follower():
            _report_interrupt(stop.signum, stop.run_dir, stop.saved, fresh_dir)
        sys.exit(stop.exit_code)
    except UserError as exc:
        if multirun:
            _record_failure(_job_dir(), exc, started)
            raise  # Hydra records the failed job and goes on with the others; main() prints the sweep table
        if _full_error():
            raise
        if not launch.follower():  # rank 0 speaks for every rank, and the run directory is its to remove
            rundir.remove_if_unused(fresh_dir)
            _print_error(str(exc))
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:
        if multirun:
            _record_failure(_job_dir(), exc, started)
        raise
    finally:
        if job_done is not None:
            job_done.set()
        rundir.unlock_runs()  # a sweep's next job may run in this process; the sweep directory stays held
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if missed and not multirun:  # in a sweep the job's summary.json records it and main() exits 3 at the end
        for line in missed:
            sys.stderr.write(f"shelltrain: gate missed: {line}\n")
        sys.exit(sweep.EXIT_GATE_FAILED)
    return result


def run_job(cfg: DictConfig, run_dir: Path) -> tuple[Any, list[str]]:
    """Validate, settle what to resume (which may move the job into an earlier run's directory), run, and
    check the quality gates. Returns the runner's result (a sweeper's objective) and the gates missed."""

    if not launch.follower():  # one writer per run directory (taken earlier by KeepRecords under the CLI)
        rundir.lock(run_dir)
    validate(cfg)
    check_baseline_run(cfg.gate)  # gate.baseline: a finished run with predictions, named before training
    hydra_cfg = HydraConfig.get()
    _check_sweeper(hydra_cfg, cfg)
    in_use = rundir.in_use(hydra_cfg) and not launch.follower()  # rank 0 decides for every rank
    if in_use and (cfg.task != "train" or cfg.trainer.resume is None):
        rundir.refuse_in_use(hydra_cfg, _in_use_message(cfg, run_dir))
    resume = None
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    if cfg.trainer.resume is not None:
        from shelltrain.resume import plan  # imports torch: a resume reads checkpoints

        fresh_dir = run_dir
        cfg, run_dir, resume, overrides = plan(cfg, run_dir, overrides)
        if run_dir != fresh_dir and not launch.follower():  # continuing an earlier run: its directory now
            rundir.lock(run_dir)
        if in_use and (resume is None or not resume.in_place or run_dir != fresh_dir):
            rundir.refuse_in_use(hydra_cfg, _in_use_message(cfg, fresh_dir))
    checkpoint = str(resume.checkpoint) if resume is not None else None
    launch.tell_followers({"run_dir": str(run_dir), "resume": checkpoint})
    if cfg.trainer.devices > 1 and not launch.under_torchrun():
        return launch.launch_processes(cfg, run_dir, checkpoint, overrides)
    cache_freed_memory(cfg.trainer.host_memory_cache_mib)  # before torch allocates (docs/scaling-out.md)
    with painting(cfg.plots and cfg.task == "train" and not launch.follower()):  # before torch: see painting.py
        from shelltrain.jobs import run  # imports torch: only once a job really runs

        result = run(cfg, run_dir, resume=resume, overrides=overrides)
    return result, [] if launch.follower() else _apply_gates(cfg, run_dir)


def _in_use_message(cfg: DictConfig, run_dir: Path) -> str:
    """Why a job may not write into `run_dir`, which holds another job's records, and a free directory instead."""
    free = rundir.free_dir(run_dir, str(cfg.task) if cfg.task != "train" else "new")
    if cfg.task != "train":
        return (
            f"hydra.run.dir '{run_dir}' holds another job's records, which task={cfg.task} would overwrite; "
            f"give it a free directory, e.g. hydra.run.dir={free}"
        )
    if not rundir.has_checkpoint(run_dir):
        return (
            f"hydra.run.dir '{run_dir}' holds the records of a run that stopped before its first checkpoint (nothing "
            f"to resume); start again in a free directory, e.g. hydra.run.dir={free}, or delete '{run_dir}'"
        )
    return (
        f"hydra.run.dir '{run_dir}' already holds a run; continue it with trainer.resume={run_dir}, "
        f"or start a new one in a free directory, e.g. hydra.run.dir={free}"
    )


def run_in_dir(run_dir: str | Path, *overrides: str, raise_on_gate: bool = False) -> dict[str, Any]:
    """One job from Python (a notebook, a benchmark, a test), as `shelltrain *overrides` would run it but in this
    process and in `run_dir`, without Hydra's .hydra/ record; its log goes to `run_dir`/train.log as the
    command's does. Returns its summary.json, whose `run_dir` is absolute.

    A mistake in the config raises UserError (one line, as the command prints it) before `run_dir` is created.
    Missed quality gates are recorded in the summary's "gates" (`passed: false`, `failures`); with
    `raise_on_gate=True` they raise errors.GateMissed (a UserError) instead, as the command exits 3."""
    from hydra import compose, initialize_config_module

    run_dir = Path(run_dir).absolute()
    # The config module stays initialized while the job runs: resuming may compose the config again.
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        try:
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        except Exception as exc:  # Hydra's composition errors: an unknown key or option, a bad override
            message = explain(exc)
            if message is None:
                raise
            raise UserError(message) from exc
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # the job sees what @hydra.main gives it: the config without the hydra node
        validate(cfg)
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with _log_to(run_dir / rundir.LOG):
                _, missed = run_job(cfg, run_dir)
        except UserError:
            if created:
                rundir.remove_if_unused(run_dir)  # as the command does: a job that wrote nothing leaves nothing
            raise
        finally:
            rundir.unlock_runs()
    result = rundir.read_json(rundir.summary(_job_dir()))  # a resumed job moved into the original run dir
    if missed and raise_on_gate:
        raise GateMissed(missed, result)
    return result


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """shelltrain's log records into `path` (appended) while the job runs, as the command's job logging does."""
    logger = logging.getLogger("shelltrain")
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    level, before = logger.level, list(logger.handlers)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        for added in [h for h in logger.handlers if h not in before]:  # ours, or where resuming moved it
            logger.removeHandler(added)
            added.close()
        logger.setLevel(level)


def _job_dir() -> Path:
    """This job's run directory now: a resumed job has moved into the run it continues."""
    return Path(HydraConfig.get().runtime.output_dir)


def main() -> None:
    """Console entry point."""
    if sys.argv[1:2] == ["summarize"]:  # `shelltrain summarize DIR`, the same as `shelltrain-summary DIR`
        sys.exit(sweep.main(sys.argv[2:]))
    if "--version" in sys.argv[1:]:
        print(version())
        return
    wait_passively_when_busy()
    install_error_reporter()
    if launch.under_torchrun():
        launch.run_as_rank(_task)
    else:
        _task()


def wait_passively_when_busy(load: float | None = None) -> bool:
    """On a machine busier than this process's cores when the command starts (a 1-minute load average of at least
    cores + 1), torch's OpenMP threads wait for work asleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning, which
    burns the time slices the other processes and threads need: one resnet18 epoch on digits took 49 s instead of
    179 s (2 threads, load 12 on 2 cores). The numbers a run computes do not change. Set before torch is imported
    (its OpenMP reads it once); a policy set in the environment is kept. True when it was set here."""
    cores = affinity_cores()
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else load
    if "OMP_WAIT_POLICY" in os.environ or load is None or load < cores + 1:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def version() -> str:
    """shelltrain's version and the torch it runs on, read from the installed packages' metadata (importing
    torch would take seconds)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(package: str) -> str:
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"shelltrain {of('shelltrain')} (torch {of('torch')}, torchvision {of('torchvision')}, "
        f"hydra-core {of('hydra-core')})"
    )


def install_error_reporter() -> None:
    """Hydra 1.3 offers no public hook for reporting the errors of composing and running a job: its private
    `hydra._internal.utils.run_and_report` prints a traceback and exits 1. Wrap it with ours (once, however
    often called); tests/unit/test_cli.py fails loudly when Hydra changes it."""
    from hydra._internal import utils as hydra_internal

    hydra_report = getattr(hydra_internal.run_and_report, "__wrapped__", hydra_internal.run_and_report)
    hydra_internal.run_and_report = _report_user_errors(hydra_report)


def _report_user_errors(hydra_report: Callable[[Callable[[], Any]], Any]) -> Callable:
    """Wrap Hydra's error reporter: mistakes in the command line become one line naming the fix, and a
    multirun always ends with its summary table (Hydra skips `on_multirun_end` when a job failed)."""

    @functools.wraps(hydra_report)
    def report(func: Callable[[], Any]) -> Any:
        try:
            result = hydra_report(func) if _full_error() else func()
        except Exception as exc:
            outcome = sweep.finish()  # a multirun prints its table now, failed jobs included
            _exit_if_interrupted(outcome)
            if outcome is not None and outcome.exit_code:
                _print_error(sweep.failure_line(outcome))
                if _full_error():
                    raise
                sys.exit(outcome.exit_code)
            if _full_error():
                raise
            message = explain(exc)
            if message is None:
                return hydra_report(lambda error=exc: _reraise(error))  # a bug: keep Hydra's traceback
            _print_error(message)
            sys.exit(EXIT_USER_ERROR)
        outcome = sweep.finish()
        _exit_if_interrupted(outcome)
        if outcome is not None and outcome.exit_code:
            _print_error(sweep.failure_line(outcome))
            sys.exit(outcome.exit_code)
        return result

    return report


def _exit_if_interrupted(outcome: sweep.Outcome | None) -> None:
    """A process-based sweep stopped by a signal (sweep_stop.SweepStop): every job has recorded its state; say how
    to continue the sweep and exit 128 + the signal, as a sweep in one process does."""
    if outcome is None or outcome.interrupted is None:
        return
    from shelltrain.resume import sweep_command

    name = signal.Signals(outcome.interrupted).name
    message = f"interrupted by {name}: each job's state is recorded in {outcome.sweep_dir}. Resume with:"
    sys.stderr.write(f"shelltrain: {message}\n  {sweep_command(outcome.sweep_dir)}\n")
    sys.exit(128 + outcome.interrupted)


def _report_interrupt(signum: int, run_dir: Any, saved: bool, fresh_dir: Path) -> None:
    """Say how the run stopped and, when a checkpoint exists, the exact command that continues it."""
    name = signal.Signals(signum).name
    run_dir = Path(run_dir) if run_dir is not None else _job_dir()
    rundir.remove_if_unused(fresh_dir)
    if not rundir.has_checkpoint(run_dir):
        _print_error(f"interrupted by {name} before the first checkpoint; nothing to resume")
        return
    from shelltrain import resume

    how = "a checkpoint was saved" if saved else "stopped at once; the last checkpoint is kept"
    message = f"interrupted by {name}: {how} in {run_dir}. Resume with:\n  {resume.command(run_dir)}"
    log.info(message.replace("\n ", ""))
    sys.stderr.write(f"shelltrain: {message}\n")
    sys.stderr.flush()


def _record_failure(run_dir: Path, exc: BaseException, started: float) -> None:
    """A failed sweep job still leaves a summary.json: status "failed" and its one-line error (a run that got as far
    as its report keeps its figures); a bug's traceback goes beside it, in error.log."""
    error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, UserError) and str(cause) not in error:
        error += f" ({type(cause).__name__}: {cause})"  # e.g. what Hydra's InstantiationException wraps
    error = " ".join(error.split()) or type(exc).__name__
    fields: dict[str, Any] = {
        "error": error if len(error) <= 400 else error[:397] + "...",
        "error_type": type(exc).__name__,
        "wall_seconds": summary.read(run_dir).get("wall_seconds", round(time.perf_counter() - started, 3)),
    }
    if not isinstance(exc, UserError) and not job_records.borrowed(run_dir):  # a bug: the traceback beside the job
        import traceback

        try:
            rundir.write_text("".join(traceback.format_exception(exc)), run_dir / rundir.ERROR_LOG)
            fields["traceback"] = rundir.ERROR_LOG
        except UserError as write_error:  # the launcher still reports the failure; only the table loses this
            log.warning("could not record the failure in %s: %s", run_dir, write_error)
    summary.record(run_dir, "failed", **fields)


def _record_interrupt(run_dir: Path, signum: int, started: float) -> None:
    """A launcher worker's job stopped by the sweep: its summary.json says so (the runner records where
    training stopped; a job stopped before or between its stages, or never started, is recorded here)."""
    if summary.read(run_dir).get("status") == "interrupted":
        return
    wall_seconds = round(time.perf_counter() - started, 3)
    summary.record(run_dir, "interrupted", signal=signal.Signals(signum).name, wall_seconds=wall_seconds)


def _apply_gates(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Check cfg.gate against the run's summary.json, record the verdict there, return the misses."""
    gate = cfg.gate
    if not active(gate) or not rundir.summary(run_dir).is_file():
        return []
    recorded = with_baseline(gate, rundir.read_json(rundir.summary(run_dir)), run_dir)  # gate.baseline: printed
    verdict = check(gate, recorded)
    summary.write({**recorded, "gates": verdict}, run_dir)
    if verdict["passed"]:
        checked = [c["text"] for c in verdict["checked"].values()]
        sys.stdout.write(f"quality gates passed: {'; '.join(checked)}\n")
    return list(verdict["failures"])


def _check_sweeper(hydra_cfg: DictConfig, cfg: DictConfig) -> None:
    """An Optuna search must optimize in the direction of trainer.monitor (the value each job returns)."""
    sweeper = hydra_cfg.get("sweeper")
    if sweeper is None or "optuna" not in str(sweeper.get("_target_", "")).lower():
        return
    direction = str(sweeper.get("direction", "")).rsplit(".", 1)[-1].lower()
    expected = "minimize" if str(cfg.trainer.monitor).endswith("loss") else "maximize"
    if direction in ("minimize", "maximize") and direction != expected:
        raise UserError(
            f"hydra.sweeper.direction={direction} but each job returns trainer.monitor={cfg.trainer.monitor}; "
            f"set hydra.sweeper.direction={expected}"
        )


def _print_error(message: str) -> None:
    sys.stderr.write(f"shelltrain: error: {message}\n")


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _reraise(exc: BaseException) -> None:
    raise exc
