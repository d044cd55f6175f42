"""The `shelltrain` command: Hydra composes the config, the runner does the work.

Kept free of torch imports so that `--help` and `--cfg job` answer in a fraction of a second.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra._internal import utils as hydra_internal
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ValidationError

from shelltrain import sweep
from shelltrain.errors import Interrupted, UserError

# Exit codes (README "Using shelltrain in CI"): 0 success; 1 an unexpected error (traceback);
# 2 a config or input mistake; 3 a quality gate missed; 4 one or more jobs of a multirun failed.
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = sweep.EXIT_GATE_FAILED
EXIT_JOBS_FAILED = sweep.EXIT_JOBS_FAILED

# Sweeper/launcher options that come from the optional `[sweep]` extra, and the plugin providing each.
PLUGIN_OPTIONS = {
    "optuna": "hydra-optuna-sweeper",
    "joblib": "hydra-joblib-launcher",
    "submitit_local": "hydra-submitit-launcher",
    "submitit_slurm": "hydra-submitit-launcher",
    "slurm": "hydra-submitit-launcher",
}
log = logging.getLogger("shelltrain")
_hydra_run_and_report = hydra_internal.run_and_report  # Hydra's own, which main() wraps (once, however often called)


@hydra.main(version_base="1.3", config_path="pkg://shelltrain.configs", config_name="train")
def _task(cfg: DictConfig) -> Any:
    hydra_cfg = HydraConfig.get()
    fresh_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.perf_counter()
    previous = _exit_on_sigterm()
    try:
        result, missed = run_job(cfg, fresh_dir)
    except Interrupted as exc:
        if not _follower():
            _report_interrupt(exc.signum, exc.run_dir, exc.saved, fresh_dir)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if not _follower():
            _report_interrupt(signal.SIGINT, None, False, fresh_dir)
        sys.exit(128 + signal.SIGINT)
    except UserError as exc:
        if multirun:
            _record_failure(_job_dir(), exc, started)
            raise  # Hydra records the failed job and goes on with the others; main() prints the sweep table
        if _full_error():
            raise
        if not _follower():  # rank 0 speaks for every rank, and the run directory is its to remove
            _remove_if_unused(fresh_dir)
            _print_error(str(exc))
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:
        if multirun:
            _record_failure(_job_dir(), exc, started)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if missed and not multirun:  # in a sweep the job's summary.json records it and main() exits 3 at the end
        for line in missed:
            sys.stderr.write(f"shelltrain: gate missed: {line}\n")
        sys.exit(EXIT_GATE_FAILED)
    return result


def run_job(cfg: DictConfig, run_dir: Path) -> tuple[Any, list[str]]:
    """Validate, settle what to resume (which may move the job into an earlier run's directory), run, and
    check the quality gates. Returns the runner's result (a sweeper's objective) and the gates missed."""
    from shelltrain.schema import validate

    validate(cfg)
    _check_sweeper(HydraConfig.get(), cfg)
    resume = None
    overrides = [str(o) for o in HydraConfig.get().overrides.task]
    if cfg.trainer.resume is not None:
        cfg, run_dir, resume, overrides = plan_resume(cfg, run_dir, overrides)
    checkpoint = str(resume.checkpoint) if resume is not None else None
    if _followers_waiting:
        _tell_followers({"run_dir": str(run_dir), "resume": checkpoint})
    if cfg.trainer.devices > 1 and not _under_torchrun():
        return _launch_processes(cfg, run_dir, checkpoint, overrides)
    from shelltrain.runner import run  # imports torch: only once a job really runs

    result = run(cfg, run_dir, resume=resume, overrides=overrides)
    return result, [] if _follower() else _apply_gates(cfg, run_dir)


def run_in_dir(run_dir: str | Path, *overrides: str) -> dict[str, Any]:
    """One job from Python (a notebook, a benchmark, a test), as `shelltrain *overrides` would run it but in this
    process and in `run_dir`, without Hydra's .hydra/ record and logging. Returns its summary.json; a mistake in
    the config raises UserError."""
    import json

    from hydra import compose, initialize_config_module

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The config module stays initialized while the job runs: resuming may compose the config again.
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # the job sees what @hydra.main gives it: the config without the hydra node
        run_job(cfg, run_dir)
    final_dir = _job_dir()  # a resumed job moves into the original run dir
    return json.loads((final_dir / "summary.json").read_text())


def _job_dir() -> Path:
    """This job's run directory now: a resumed job has moved into the run it continues."""
    return Path(HydraConfig.get().runtime.output_dir)


def main() -> None:
    """Console entry point."""
    if sys.argv[1:2] == ["summarize"]:  # `shelltrain summarize DIR`, the same as `shelltrain-summary DIR`
        from shelltrain.sweep import main as summary_main

        sys.exit(summary_main(sys.argv[2:]))
    hydra_internal.run_and_report = _report_user_errors(_hydra_run_and_report)
    if _under_torchrun():
        _run_as_rank()
    else:
        _task()


# -- several processes (torchrun, trainer.devices) ----------------------------------------------------------

_followers_waiting = False  # rank 0 under torchrun, until it has told the other ranks where the run goes


def _under_torchrun() -> bool:
    """One of several processes started by torchrun (or by trainer.devices), read without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _follower() -> bool:
    """A rank other than 0: it trains, but writes no files and prints nothing of its own."""
    return _under_torchrun() and os.environ.get("RANK", "0") != "0"


def _run_as_rank() -> None:
    """Under torchrun, every rank runs this command. Hydra would give each its own `${now:...}` run directory,
    so rank 0 composes the job as usual and, once it has settled the run directory (and the checkpoint a
    resume starts from), broadcasts them; the other ranks then compose the same job into that directory with
    Hydra's own files and logging turned off."""
    from shelltrain import distributed

    global _followers_waiting
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        if not _follower():
            _print_error(
                "a multirun sweep cannot run under torchrun; sweep with trainer.devices=N instead, "
                "which starts the processes of each job itself"
            )
        sys.exit(EXIT_USER_ERROR)
    distributed.init()
    try:
        if _follower():
            decision = distributed.broadcast(None)
            if "exit" in decision:  # rank 0 ended before training (--help, --cfg, a config error): so do we
                sys.exit(decision["exit"])
            sys.argv[1:] = [
                *_into_run(sys.argv[1:], decision["run_dir"], decision["resume"]),
                "hydra.output_subdir=null",
                "hydra/job_logging=none",
                "hydra/hydra_logging=none",
            ]
            _task()
            return
        _followers_waiting = True
        code: Any = 1
        try:
            _task()
            code = 0
        except SystemExit as exc:
            code = exc.code
            raise
        finally:
            if _followers_waiting:
                _tell_followers({"exit": code if isinstance(code, int) else int(code is not None)})
    finally:
        distributed.shutdown()


def _tell_followers(decision: dict[str, Any]) -> None:
    from shelltrain import distributed

    global _followers_waiting
    _followers_waiting = False
    distributed.broadcast(decision)


def _into_run(args: list[str], run_dir: str, resume: str | None) -> list[str]:
    """A command line made to continue in `run_dir` from the checkpoint `resume` (None: from scratch), where
    a resume already settled on lands without moving or searching again."""
    kept = [a for a in args if not _is_override_of(a, "trainer.resume") and not _is_override_of(a, "hydra.run.dir")]
    return [*kept, f"trainer.resume={_quoted(resume) if resume else 'null'}", f"hydra.run.dir={_quoted(run_dir)}"]


def _launch_processes(
    cfg: DictConfig, run_dir: Path, checkpoint: str | None, overrides: list[str]
) -> tuple[Any, list[str]]:
    """trainer.devices=N: run this job in N processes on this machine (torchrun --standalone), into this job's run
    directory. The processes print and record everything themselves (errors, gates, how to resume); this one
    passes on their exit code, or in a sweep returns the score from the summary.json they wrote."""
    from shelltrain import distributed

    processes = int(cfg.trainer.devices)
    args = _into_run(_config_flags(HydraConfig.get()) + overrides, str(run_dir), checkpoint)
    _note(f"trainer.devices={processes}: training in {processes} processes (DDP) into {run_dir}")
    code = distributed.launch(processes, args)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if code not in (0, EXIT_GATE_FAILED):
        if multirun:
            raise UserError(f"the {processes} training processes ended with exit code {code} (see their output)")
        sys.exit(code)
    if code == EXIT_GATE_FAILED and not multirun:
        sys.exit(code)
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    return summary.get(f"best_{cfg.trainer.monitor}", summary.get("test_acc")), []


def _config_flags(hydra_cfg: Any) -> list[str]:
    """The --config-dir and --config-name this job was composed with (read from Hydra, not from sys.argv, which
    under a launcher such as submitit is not the shelltrain command line)."""
    flags = [
        f"--config-dir={source.path}"
        for source in hydra_cfg.runtime.config_sources
        if source.provider == "command-line" and source.schema == "file"
    ]
    return [*flags, f"--config-name={hydra_cfg.job.config_name}"]


def _quoted(value: str) -> str:
    """A value for a Hydra override, quoted where needed so that paths with spaces, commas or '=' pass as they are."""
    if re.fullmatch(r"[\w./@+-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def _is_override_of(arg: str, key: str) -> bool:
    return arg.lstrip("+~").split("=", 1)[0] == key


# -- resuming ---------------------------------------------------------------------------------------------


def plan_resume(cfg: DictConfig, fresh_dir: Path, overrides: list[str]) -> tuple[DictConfig, Path, Any, list[str]]:
    """Resolve trainer.resume to (config, run directory, runner.Resume or None, effective overrides).

    A run directory (or its last.pt) continues in place: this job's fresh Hydra directory is removed and
    its log goes on in the original train.log. The checkpoint's own overrides (stored in it) are applied
    under the new ones, so `shelltrain trainer.resume=DIR` alone continues DIR as it was configured. An
    older checkpoint of a run (best.pt while last.pt is further on), or one outside any run directory,
    starts a new run directory from it and leaves the original untouched. An ensemble's run directory continues
    in place, member by member (the runner's Resume then names that directory)."""
    from shelltrain.checkpoint import LAST, Resume, checkpoint_position, find_resumable, load_checkpoint, resolve_resume
    from shelltrain.rundir import is_ensemble_run
    from shelltrain.schema import uses_ensemble, validate

    hydra_cfg = HydraConfig.get()
    value = str(cfg.trainer.resume)
    if value == "auto":
        root = _output_root(hydra_cfg, fresh_dir)
        found = find_resumable(root, OmegaConf.to_container(cfg, resolve=True))
        if found is None:
            _note(f"trainer.resume=auto: no checkpoint of this config under {root}; starting a new run")
            return cfg, fresh_dir, None, overrides
        checkpoint, owner = found / "checkpoints" / LAST, found
    else:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise UserError(
                f"trainer.resume={value} in a multirun sweep would start every job from the same checkpoint; "
                "resume a sweep with the same overrides plus hydra.sweep.dir=<its dir> trainer.resume=auto"
            )
        target = (_launch_dir(hydra_cfg) / os.path.expanduser(value)).absolute()
        if is_ensemble_run(target):  # members that finished are kept, the others continue or train
            cfg, overrides = _recompose(cfg, None, target, overrides, hydra_cfg)
            validate(cfg)
            if not uses_ensemble(cfg):
                raise UserError(
                    f"trainer.resume: '{target}' is an ensemble run directory, but this config trains no ensemble; "
                    "resume it with the overrides it was started with"
                )
            if target.resolve() != fresh_dir.resolve():
                _move_into(target, fresh_dir)
            return cfg, target, Resume(target, in_place=True), overrides
        checkpoint, owner = resolve_resume(target)
        cfg, overrides = _recompose(cfg, checkpoint, owner, overrides, hydra_cfg)
        validate(cfg)
        if uses_ensemble(cfg):
            raise UserError(
                f"trainer.resume: '{checkpoint}' is a single run's checkpoint; an ensemble resumes from its own run "
                "directory (the one holding members/)"
            )
    payload = load_checkpoint(checkpoint)  # a corrupt, truncated or foreign file fails here, before any data
    in_place = owner is not None and (
        checkpoint == owner / "checkpoints" / LAST
        or not (owner / "checkpoints" / LAST).is_file()
        or checkpoint_position(checkpoint) >= checkpoint_position(owner / "checkpoints" / LAST)
    )
    if not in_place:
        return cfg, fresh_dir, Resume(checkpoint, in_place=False, payload=payload), overrides
    assert owner is not None
    if owner.resolve() != fresh_dir.resolve():
        _move_into(owner, fresh_dir)
    return cfg, owner, Resume(checkpoint, in_place=True, payload=payload), overrides


def _output_root(hydra_cfg: Any, fresh_dir: Path) -> Path:
    """Where `auto` looks: the fixed leading part of hydra.run.dir (hydra.sweep.dir in a sweep), e.g. outputs/."""
    node = hydra_cfg.sweep if hydra_cfg.mode == RunMode.MULTIRUN else hydra_cfg.run
    pattern = str(OmegaConf.to_container(node, resolve=False)["dir"])
    fixed = []
    for part in Path(pattern).parts:
        if "${" in part:
            break
        fixed.append(part)
    if not fixed:
        return fresh_dir.parent
    return _launch_dir(hydra_cfg) / Path(*fixed)


def _launch_dir(hydra_cfg: Any) -> Path:
    """Where the command was started: relative paths on the command line are relative to it."""
    cwd = OmegaConf.select(hydra_cfg, "runtime.cwd", default=None)
    return Path(cwd) if cwd else Path.cwd()


def _recompose(
    cfg: DictConfig, checkpoint: Path | None, owner: Path | None, current: list[str], hydra_cfg: Any
) -> tuple[DictConfig, list[str]]:
    """The config the checkpoint was trained with (its stored overrides, else its run's .hydra record; an
    ensemble's run has no checkpoint of its own), with this command's overrides on top (same key: the new one
    wins); and that list of overrides."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from shelltrain.checkpoint import stored_overrides

    original = stored_overrides(checkpoint) if checkpoint is not None else None
    source = f"checkpoint '{checkpoint}'"
    if original is None and owner is not None and (owner / ".hydra" / "overrides.yaml").is_file():
        source = str(owner / ".hydra" / "overrides.yaml")
        original = [str(o) for o in OmegaConf.load(owner / ".hydra" / "overrides.yaml")]
    if not original:
        return cfg, current
    parser = OverridesParser.create()

    def key(override: Any) -> tuple[str, str | None]:
        return override.key_or_group, override.package

    try:
        given = {key(o) for o in parser.parse_overrides(current)}
        kept = [text for text, o in zip(original, parser.parse_overrides(original)) if key(o) not in given]
    except OverrideParseException as exc:
        raise UserError(f"trainer.resume: cannot read the overrides of {source}: {_first_line(str(exc))}") from None
    if not kept:
        return cfg, current
    merged = [*kept, *current]
    try:
        return compose(config_name=hydra_cfg.job.config_name, overrides=merged), merged
    except Exception as exc:  # the original options may be gone (e.g. a --config-dir not given this time)
        reason = explain(exc) or _first_line(str(exc))
        raise UserError(f"trainer.resume: cannot rebuild the config of {source} from {kept}: {reason}") from None


def _move_into(owner: Path, fresh_dir: Path) -> None:
    """Continue in `owner`: the log goes on in its train.log and this job's fresh directory goes away.
    `owner`/.hydra stays the record of how the run started; what changed on resuming is logged, and every
    checkpoint stores the config and overrides it was trained with."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh_dir:
                moved = logging.FileHandler(owner / Path(handler.baseFilename).name, mode="a")
                moved.setFormatter(handler.formatter)
                moved.setLevel(handler.level)
                logger.removeHandler(handler)
                handler.close()
                logger.addHandler(moved)
    _remove_dir(fresh_dir)
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.runtime.output_dir = str(owner)


def _report_interrupt(signum: int, run_dir: Any, saved: bool, fresh_dir: Path) -> None:
    """Say how the run stopped and, when a checkpoint exists, the exact command that continues it."""
    name = signal.Signals(signum).name
    run_dir = Path(run_dir) if run_dir is not None else Path(HydraConfig.get().runtime.output_dir)
    _remove_if_unused(fresh_dir)
    from shelltrain.rundir import has_checkpoint

    if not has_checkpoint(run_dir):
        _print_error(f"interrupted by {name} before the first checkpoint; nothing to resume")
        return
    how = "a checkpoint was saved" if saved else "stopped at once; the last checkpoint is kept"
    command = resume_command(run_dir)
    message = f"interrupted by {name}: {how} in {run_dir}. Resume with:\n  {command}"
    log.info(message.replace("\n ", ""))
    sys.stderr.write(f"shelltrain: {message}\n")
    sys.stderr.flush()


def resume_command(run_dir: Path) -> str:
    """This command line again, continuing `run_dir` (a sweep: every job of the same sweep dir)."""
    args = [a for a in sys.argv[1:] if not _is_override_of(a, "trainer.resume")]
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir).absolute()
        args = [a for a in args if not _is_override_of(a, "hydra.sweep.dir")]
        args += [f"hydra.sweep.dir={sweep_dir}", "trainer.resume=auto"]
    else:
        args.append(f"trainer.resume={Path(run_dir).absolute()}")
    program = ["shelltrain"]
    if _under_torchrun() and not any(_is_override_of(a, "trainer.devices") for a in args):
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = int(os.environ["WORLD_SIZE"]) // per_node
        program = [
            "torchrun",
            *([f"--nnodes={nodes}"] if nodes > 1 else []),
            f"--nproc-per-node={per_node}",
            "-m",
            "shelltrain",
        ]
    return shlex.join([*program, *args])


def _exit_on_sigterm() -> Any:
    """Outside training (which stops gracefully), SIGTERM ends the job like Ctrl-C: cleanly, exit 143."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Interrupted(signum, None, saved=False)

    return signal.signal(signal.SIGTERM, terminate)


def _note(message: str) -> None:
    print(message)
    log.info(message)


def _report_user_errors(hydra_report: Callable[[Callable[[], Any]], Any]) -> Callable:
    """Wrap Hydra's error reporter: mistakes in the command line become one line naming the fix, and a
    multirun always ends with its summary table (Hydra skips `on_multirun_end` when a job failed)."""

    def report(func: Callable[[], Any]) -> Any:
        try:
            result = hydra_report(func) if _full_error() else func()
        except Exception as exc:
            outcome = sweep.finish()  # a multirun prints its table now, failed jobs included
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
        if outcome is not None and outcome.exit_code:
            _print_error(sweep.failure_line(outcome))
            sys.exit(outcome.exit_code)
        return result

    return report


def _record_failure(run_dir: Path, exc: BaseException, started: float) -> None:
    """A failed sweep job still leaves a summary.json: status "failed" and its one-line error."""
    import json

    path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    try:
        if path.is_file():
            summary = json.loads(path.read_text())  # a run that got as far as its report keeps its figures
    except (OSError, ValueError):
        summary = {}
    error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, UserError) and str(cause) not in error:
        error += f" ({type(cause).__name__}: {cause})"  # e.g. what Hydra's InstantiationException wraps
    error = " ".join(error.split()) or type(exc).__name__
    summary.update(
        status="failed",
        error=error if len(error) <= 400 else error[:397] + "...",
        error_type=type(exc).__name__,
        wall_seconds=summary.get("wall_seconds", round(time.perf_counter() - started, 3)),
        run_dir=str(run_dir),
    )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not isinstance(exc, UserError):  # a bug: keep the traceback next to the job for the report
            import traceback

            (run_dir / "error.log").write_text("".join(traceback.format_exception(exc)))
            summary["traceback"] = "error.log"
        tmp = path.with_name(".summary.json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # the launcher still reports the failure; only the table loses this row's message


def _apply_gates(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Check cfg.gate against the run's summary.json, record the verdict there, return the misses."""
    import json

    from shelltrain.gates import active, check

    gate = cfg.get("gate")
    path = run_dir / "summary.json"
    if not active(gate) or not path.is_file():
        return []
    summary = json.loads(path.read_text())
    verdict = check(gate, summary)
    summary["gates"] = verdict
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    if verdict["passed"]:
        checked = [
            f"{key[:-4]}={c['value']:.6g} {'>=' if key.endswith('_min') else '<='} {c['limit']:g}"
            for key, c in verdict["checked"].items()
        ]
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


def explain(exc: BaseException) -> str | None:
    """A one-line message for a config mistake, or None when `exc` is not the user's doing."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        return _explain_missing_option(exc)
    if isinstance(exc, OverrideParseException):
        return f"could not parse the override: {_first_line(str(exc))}"
    if isinstance(exc, ConfigCompositionException):
        return _explain_composition(exc)
    if isinstance(exc, OSError) and exc.errno in _PLACE_ERRNOS:
        where = f"'{exc.filename}'" if exc.filename else "the run directory"
        return (
            f"cannot create or write {where}: {exc.strerror or exc}; choose a writable place for the run "
            "directory with hydra.run.dir=DIR (hydra.sweep.dir=DIR for -m)"
        )
    return None


# Failures to create or write the run directory: where the output goes, not a bug.
_PLACE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
}


def _explain_missing_option(exc: MissingConfigException) -> str:
    missing = exc.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    # Hydra lists the options for GROUP=OPTION but not for an option inside a list (logger=[csv,foo])
    available = exc.options if exc.options is not None else _group_options(group)
    if not group or not available:
        return _first_line(str(exc))
    options = ", ".join(sorted(available))
    hint = _did_you_mean(option, available)
    if group in ("hydra/sweeper", "hydra/launcher") and option in PLUGIN_OPTIONS:
        return (
            f"{group}={option} needs the {PLUGIN_OPTIONS[option]} plugin, which is not installed; "
            'install the sweep extra: pip install "shelltrain[sweep]"'
        )
    return (
        f"{group}={option}: no such option{hint}. Available {group} options: {options} "
        f"(add your own as DIR/{group}/{option}.yaml with --config-dir DIR)"
    )


def _explain_composition(exc: ConfigCompositionException) -> str:
    text = str(exc)
    match = re.match(r"Could not override '([^']+)'", text)
    if match is None:
        cause = exc.__cause__
        if isinstance(cause, ValidationError):  # a value of the wrong type for its group's schema
            from shelltrain.checks import wrong_type

            return wrong_type(cause)
        detail = _first_line(str(cause)) if cause is not None else _first_line(text)
        return f"invalid config: {detail}"
    key = match.group(1)
    groups = _known_groups()
    if "." not in key and ("No match in the defaults list" in text or _did_you_mean(key, groups)):
        return (
            f"'{key}' is not a config group{_did_you_mean(key, groups)}; groups: {', '.join(sorted(groups))} "
            f"(to add a new top-level key on purpose use +{key}=...)"
        )
    parent_key, _, leaf = key.rpartition(".")
    siblings = _keys_of(getattr(exc.__cause__, "parent_node", None))
    hint = _did_you_mean(leaf, siblings, prefix=f"{parent_key}." if parent_key else "")
    valid = f" Valid keys of {parent_key or 'the config'}: {', '.join(siblings)}." if siblings else ""
    return (
        f"unknown key '{key}'{hint}.{valid} "
        f"(to add a new key on purpose, e.g. an argument of a custom _target_, use +{key}=...)"
    )


def _keys_of(node: Any) -> list[str]:
    if isinstance(node, DictConfig):
        return [str(k) for k in node.keys() if not str(k).startswith("_") and k != "hydra"]
    return []


def _known_groups() -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return [g for g in loader.list_groups("") if g != "hydra"]


def _group_options(group: str) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    if not group or not GlobalHydra.instance().is_initialized():
        return []
    return GlobalHydra.instance().config_loader().get_group_options(group)


def _did_you_mean(word: str, candidates: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _remove_if_unused(run_dir: Path) -> None:
    """Drop a run dir that holds only what Hydra wrote at start-up, so failed starts leave no litter.

    A dir with checkpoints or a summary holds results (a resumed run) and is never touched.
    """
    if not run_dir.is_dir():
        return
    produced = [
        p
        for p in run_dir.iterdir()
        if p.name not in (".hydra", "train.log") and not (p.is_dir() and not any(p.iterdir()))
    ]  # an empty checkpoints/ (the first write failed) holds nothing either
    if not produced:
        _remove_dir(run_dir)


def _remove_dir(run_dir: Path) -> None:
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


def _print_error(message: str) -> None:
    sys.stderr.write(f"shelltrain: error: {message}\n")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _reraise(exc: BaseException) -> None:
    raise exc
