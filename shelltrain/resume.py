"""Resuming a run: plan it (which checkpoint, which config, which run directory) and restore its state.

`trainer.resume` names a run directory, a checkpoint file or `auto`. Planning happens in the CLI before the
run starts (it may move the job into the run it continues); restoring happens in the runner once the model,
optimizer and schedule are built. Imports torch: the CLI imports this module only when a job resumes.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from shelltrain import distributed, job_records, launch, rundir
from shelltrain.best_repair import repair_best
from shelltrain.checkpoint import as_best, load_checkpoint, load_model_state, peek, save_checkpoint
from shelltrain.checks import uses_ensemble
from shelltrain.console import say
from shelltrain.engine import TrainState
from shelltrain.errors import UserError
from shelltrain.explain import explain, first_line
from shelltrain.optim import Schedule
from shelltrain.resume_auto import comparable_config as comparable_config
from shelltrain.resume_auto import find_resumable, settle_sweep_job
from shelltrain.resume_auto import finished_result as finished_result
from shelltrain.schema import validate

log = logging.getLogger("shelltrain")


@dataclass
class Resume:
    """Where a run resumes from: a checkpoint (already loaded: a bad file fails before any data loads), and
    whether the run continues in that checkpoint's own run directory (False: a new run directory starts
    from it, e.g. from an older checkpoint of a run). An ensemble resumes from its run directory (`checkpoint`),
    its members one by one."""

    checkpoint: Path
    in_place: bool
    payload: dict[str, Any] = field(default_factory=dict, repr=False)


# -- planning (the CLI, before the run starts) ------------------------------------------------------------


def plan(cfg: DictConfig, fresh_dir: Path, overrides: list[str]) -> tuple[DictConfig, Path, Resume | None, list[str]]:
    """Resolve trainer.resume to (config, run directory, Resume or None, effective overrides).

    A run directory (or its last.pt) continues in place: this job's fresh Hydra directory is removed and
    its log goes on in the original train.log. The checkpoint's own overrides (stored in it) are applied
    under the new ones, so `shelltrain trainer.resume=DIR` alone continues DIR as it was configured. An
    older checkpoint of a run (best.pt while last.pt is further on), or one outside any run directory,
    starts a new run directory from it and leaves the original untouched. An ensemble's run directory continues
    in place, member by member (its Resume then names that directory)."""
    hydra_cfg = HydraConfig.get()
    value = str(cfg.trainer.resume)
    if value == "auto":
        root = _output_root(hydra_cfg, fresh_dir)
        found = find_resumable(root, OmegaConf.to_container(cfg, resolve=True), prefer=fresh_dir)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # each job to its own run, whatever its number now
            fresh_dir = settle_sweep_job(cfg, fresh_dir, found, root)  # `found` when there is one
            if found is None:
                return cfg, fresh_dir, None, overrides
        if found is None:
            message = f"trainer.resume=auto: no checkpoint of this config under {root}; starting a new run"
            print(message)
            log.info(message)
            return cfg, fresh_dir, None, overrides
        return _continue(cfg, rundir.last_checkpoint(found), found, fresh_dir, overrides)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise UserError(
            f"trainer.resume={value} in a multirun sweep would start every job from the same checkpoint; "
            "resume a sweep with the same overrides plus hydra.sweep.dir=<its dir> trainer.resume=auto"
        )
    target = (_launch_dir(hydra_cfg) / os.path.expanduser(value)).absolute()
    if rundir.is_ensemble_run(target) or rundir.is_compress_run(target):
        return _continue_parts(cfg, target, fresh_dir, overrides)
    checkpoint, owner = resolve(target)
    cfg, overrides = _recompose(cfg, checkpoint, owner, overrides, hydra_cfg)
    validate(cfg)
    if uses_ensemble(cfg):
        raise UserError(
            f"trainer.resume: '{checkpoint}' is a single run's checkpoint; an ensemble resumes from its own run "
            "directory (the one holding members/)"
        )
    return _continue(cfg, checkpoint, owner, fresh_dir, overrides)


def _continue(
    cfg: DictConfig, checkpoint: Path, owner: Path | None, fresh_dir: Path, overrides: list[str]
) -> tuple[DictConfig, Path, Resume, list[str]]:
    """In `owner` when `checkpoint` is (at least as far as) its last.pt, else in this job's fresh directory."""
    payload = load_checkpoint(checkpoint)  # a corrupt, truncated or foreign file fails here, before any data
    last = rundir.last_checkpoint(owner) if owner is not None else None
    in_place = last is not None and (
        checkpoint == last or not last.is_file() or checkpoint_position(checkpoint) >= checkpoint_position(last)
    )
    if not in_place:
        return cfg, fresh_dir, Resume(checkpoint, in_place=False, payload=payload), overrides
    assert owner is not None
    if owner.resolve() != fresh_dir.resolve():
        _move_into(owner, fresh_dir)
    return cfg, owner, Resume(checkpoint, in_place=True, payload=payload), overrides


def _continue_parts(
    cfg: DictConfig, target: Path, fresh_dir: Path, overrides: list[str]
) -> tuple[DictConfig, Path, Resume, list[str]]:
    """A run made of sub-runs (an ensemble's members, a compression chain's stages): the finished ones are kept, the
    interrupted one continues, the others train."""
    cfg, overrides = _recompose(cfg, None, target, overrides, HydraConfig.get())
    validate(cfg)
    if rundir.is_compress_run(target) and cfg.compress is None:
        raise UserError(
            f"trainer.resume: '{target}' is a compression chain's run directory, but this config has no compress "
            "section; resume it with the overrides it was started with (e.g. experiment=compress_digits)"
        )
    if rundir.is_ensemble_run(target) and not uses_ensemble(cfg):
        raise UserError(
            f"trainer.resume: '{target}' is an ensemble run directory, but this config trains no ensemble; "
            "resume it with the overrides it was started with"
        )
    if target.resolve() != fresh_dir.resolve():
        _move_into(target, fresh_dir)
    return cfg, target, Resume(target, in_place=True), overrides


def resolve(value: str | Path) -> tuple[Path, Path | None]:
    """`trainer.resume` as (checkpoint file, the run directory it belongs to or None).

    Accepts a checkpoint file, a run directory (its checkpoints/last.pt) or a run's checkpoints/ folder;
    a checkpoint belongs to a run directory when it lies in that directory's checkpoints/ folder."""
    path = Path(os.path.expanduser(str(value))).absolute()
    if path.is_file():
        return path, path.parent.parent if path.parent.name == rundir.CHECKPOINTS else None
    if not path.exists():
        raise UserError(f"trainer.resume: '{path}' does not exist; give a checkpoint file, a run directory or auto")
    if rundir.last_checkpoint(path).is_file():
        return rundir.last_checkpoint(path), path
    if path.name == rundir.CHECKPOINTS and (path / rundir.LAST).is_file():
        return path / rundir.LAST, path.parent
    if any(path.glob(f"*/{rundir.CHECKPOINTS}/{rundir.LAST}")):
        raise UserError(
            f"trainer.resume: '{path}' is a multirun sweep directory; resume the sweep with "
            f"shelltrain -m <the same overrides> hydra.sweep.dir={path} trainer.resume=auto"
        )
    raise UserError(
        f"trainer.resume: '{path}' holds no {rundir.CHECKPOINTS}/{rundir.LAST}, so it is not a shelltrain run "
        "directory that got as far as a checkpoint; give a checkpoint file, a run directory or auto"
    )


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(epoch, step) of a checkpoint, read without materializing its tensors; (-1, -1) if unreadable."""
    payload = peek(path)
    if payload is None:
        return -1, -1
    return int(payload.get("epoch", 0)), int(payload.get("step", 0))


def stored_overrides(path: Path) -> list[str] | None:
    """The command-line overrides a checkpoint's run was configured with (None: not recorded, or unreadable:
    loading it properly reports that)."""
    overrides = (peek(path) or {}).get("overrides")
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


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
    return rundir.normalized(_launch_dir(hydra_cfg) / Path(*fixed))


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
    from hydra.errors import OverrideParseException

    original = stored_overrides(checkpoint) if checkpoint is not None else None
    source = f"checkpoint '{checkpoint}'"
    recorded = Path(owner) / rundir.OVERRIDES if owner is not None else None
    if original is None and recorded is not None and recorded.is_file():
        source, original = str(recorded), [str(o) for o in OmegaConf.load(recorded)]
    if not original:
        return cfg, current
    parser = OverridesParser.create()

    def key(override: Any) -> tuple[str, str | None]:
        return override.key_or_group, override.package

    try:
        given = {key(o) for o in parser.parse_overrides(current)}
        kept = [text for text, o in zip(original, parser.parse_overrides(original)) if key(o) not in given]
    except OverrideParseException as exc:
        raise UserError(f"trainer.resume: cannot read the overrides of {source}: {first_line(str(exc))}") from None
    if not kept:
        return cfg, current
    merged = [*kept, *current]
    try:
        return compose(config_name=hydra_cfg.job.config_name, overrides=merged), merged
    except Exception as exc:  # the original options may be gone (e.g. a --config-dir not given this time)
        reason = explain(exc) or first_line(str(exc))
        raise UserError(f"trainer.resume: cannot rebuild the config of {source} from {kept}: {reason}") from None


def _move_into(owner: Path, fresh_dir: Path) -> None:
    """Continue in `owner`: the log goes on in its train.log and this job's fresh directory goes away.
    `owner`/.hydra stays the record of how the run started, byte for byte; this job's own record (its config
    and overrides) moves beside it into `.hydra/resume-<n>/`, and every checkpoint stores the config and
    overrides it was trained with."""
    hydra_cfg = HydraConfig.get()
    if rundir.in_use(hydra_cfg):  # never remove a directory holding another job's records
        rundir.refuse_in_use(
            hydra_cfg,
            f"hydra.run.dir '{fresh_dir}' holds another job's records; trainer.resume continues '{owner}' in its "
            f"own directory: leave hydra.run.dir out (or set hydra.run.dir={owner})",
        )
    record = owner / rundir.next_record(owner, "resume")
    job_records.note(owner, record, owner / rundir.LOG)  # a refused resume takes its record and log lines away
    if hydra_cfg.output_subdir is not None:
        for path in sorted((fresh_dir / str(hydra_cfg.output_subdir)).glob("*.yaml")):
            rundir.write_atomic(path.read_bytes(), record / path.name)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh_dir:
                moved = logging.FileHandler(owner / Path(handler.baseFilename).name, mode="a")
                moved.setFormatter(handler.formatter)
                moved.setLevel(handler.level)
                logger.removeHandler(handler)
                handler.close()
                logger.addHandler(moved)
    rundir.remove_dir(fresh_dir)
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.runtime.output_dir = str(owner)


def command(run_dir: Path) -> str:
    """This command line again, continuing `run_dir` (a sweep: every job of the same sweep dir)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return sweep_command(Path(hydra_cfg.sweep.dir))
    args = [a for a in sys.argv[1:] if not launch.is_override_of(a, "trainer.resume")]
    args.append(f"trainer.resume={Path(run_dir).absolute()}")
    program = ["shelltrain"]
    if launch.under_torchrun() and not any(launch.is_override_of(a, "trainer.devices") for a in args):
        program = launch.torchrun_command()
    return shlex.join([*program, *args])


def sweep_command(sweep_dir: Path) -> str:
    """This sweep's command line again, continuing every job of `sweep_dir` (finished ones are skipped)."""
    args = [a for a in sys.argv[1:] if not launch.is_override_of(a, "trainer.resume")]
    args = [a for a in args if not launch.is_override_of(a, "hydra.sweep.dir")]
    args += [f"hydra.sweep.dir={Path(sweep_dir).absolute()}", "trainer.resume=auto"]
    return shlex.join(["shelltrain", *args])


# -- restoring (the runner, once the model, optimizer and schedule are built) -----------------------------


def payload_of(resume: Resume | None, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint a run starts from (None: a fresh start); a fresh start refuses a directory that already
    holds a run."""
    if resume is None:
        if rundir.last_checkpoint(run_dir).exists():
            raise UserError(
                f"run directory '{run_dir}' already holds a run ({rundir.CHECKPOINTS}/{rundir.LAST}); continue it "
                f"with trainer.resume={run_dir} (or trainer.resume=auto), or choose a new hydra.run.dir"
            )
        return None
    payload = resume.payload or load_checkpoint(resume.checkpoint)
    if resume.in_place and distributed.is_main():  # a crash between an epoch end's two writes: best.pt behind
        repair_best(run_dir, payload)
    return payload


def restore_training(
    payload: dict[str, Any],
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule | None,
    scaler: torch.amp.GradScaler,
    steps_per_epoch: int | None = None,
) -> TrainState:
    """Load model, optimizer, schedule and scaler state from a checkpoint; every mismatch is one line.
    `steps_per_epoch` (this run's) tells a change of the training data from a change of the schedule."""
    load_model_state(payload["model"], path, model, payload.get("config"))
    saved_config = payload.get("config") or {}
    saved_steps = payload.get("steps_per_epoch")
    if steps_per_epoch is not None and saved_steps is not None and saved_steps != steps_per_epoch:
        raise UserError(
            f"checkpoint '{path}': its run took {saved_steps} optimizer steps per epoch, this one takes "
            f"{steps_per_epoch}: the training data changed (images added or removed under data.root, or "
            "data.limit_samples, data.batch_size or trainer.accumulate changed); resume with the data it was "
            "trained on, or start a new run"
        )
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        was = (saved_config.get("optimizer") or {}).get("_target_", "?")
        reason = first_line(str(exc)) or type(exc).__name__
        raise UserError(
            f"checkpoint '{path}': its optimizer state ({was}) does not fit the configured optimizer "
            f"({reason}); resume with the optimizer settings it was trained with"
        ) from None
    saved_scheduler = payload.get("scheduler")
    if schedule is not None and saved_scheduler:
        fresh_total = getattr(schedule.scheduler, "total_steps", None)
        if fresh_total is not None and saved_scheduler.get("total_steps") not in (None, fresh_total):
            raise UserError(
                f"checkpoint '{path}': its schedule was sized for {saved_scheduler['total_steps']} steps, this "
                f"config sizes it for {fresh_total}; resume with the original trainer.epochs (and batch "
                "settings), or use a scheduler without a fixed length (e.g. scheduler=step)"
            )
        schedule.scheduler.load_state_dict(saved_scheduler)
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])  # a no-op for a disabled scaler (bf16/fp32)
    values = payload.get("train_state") or {"epoch": payload.get("epoch", 0), "step": payload.get("step", 0)}
    return TrainState.from_dict(values)


def rng_of_this_rank(payload: dict[str, Any] | None, state: TrainState) -> dict[str, Any] | None:
    """The RNG snapshot this rank resumes with: its own one from the checkpoint (every rank's is stored under
    DDP). A checkpoint taken mid-epoch by another number of processes cannot continue that epoch exactly."""
    if payload is None:
        return None
    ranks = payload.get("rng_ranks") or [payload["rng"]]
    if len(ranks) == distributed.world_size():
        return ranks[distributed.rank()]
    if state.batch:
        raise UserError(
            f"the checkpoint was taken mid-epoch by {len(ranks)} process(es) and this run has "
            f"{distributed.world_size()}; resume it with the same number (or from an epoch-end checkpoint)"
        )
    return payload["rng"]


def announce(console: Any, cfg: DictConfig, payload: dict[str, Any], resume: Resume, state: TrainState) -> None:
    """Say where the run continues from, and what changed in its config since the checkpoint."""
    where = f"epoch {state.epoch} done, step {state.step}"
    if state.batch:
        where += f", {state.batch} batches into epoch {state.epoch + 1}"
    say(console, f"resuming from [bold]{resume.checkpoint}[/bold] ({where})")
    if not resume.in_place:
        say(
            console,
            "the checkpoint is not the newest of its run (or lies outside a run directory): "
            "training continues in this new run directory, the original stays as it was",
        )
    changes = config_changes(payload.get("config"), OmegaConf.to_container(cfg, resolve=True))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        say(console, f"changed since the checkpoint: {shown}")
    if any(change.startswith(("optimizer.", "scheduler.")) for change in changes):
        say(
            console,
            "note: the optimizer and schedule continue from their saved state (learning rate included), "
            "so changed optimizer.* or scheduler.* values do not apply to a resumed run",
        )


def config_changes(before: Any, after: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs (trainer.resume aside)."""
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for key in sorted(set(before) | set(after), key=str):
            if f"{prefix}{key}" == "trainer.resume":
                continue
            changes += config_changes(before.get(key), after.get(key), f"{prefix}{key}.")
        return changes
    return [] if before == after else [f"{prefix.rstrip('.')}: {before!r} -> {after!r}"]


def seed_new_run_dir(source: Path, state: TrainState, run_dir: Path, monitor: str) -> None:
    """A run continued in a new directory starts with the checkpoint it came from as its last.pt, and the
    best checkpoint so far as best.pt when it is at hand (as best.pt holds it under `monitor`: checkpoint.as_best),
    so the new directory is complete by itself."""
    rundir.write_atomic(source.read_bytes(), rundir.last_checkpoint(run_dir))
    if state.best_epoch and state.batch == 0 and state.best_epoch == state.epoch:
        save_checkpoint(as_best(load_checkpoint(source), monitor), rundir.best_checkpoint(run_dir))
        return
    source_best = source.parent / rundir.BEST
    if state.best_epoch and source_best.is_file() and source_best != source:
        try:
            best = load_checkpoint(source_best)
        except UserError:
            return
        if int(best.get("epoch", -1)) == state.best_epoch:
            rundir.write_atomic(source_best.read_bytes(), rundir.best_checkpoint(run_dir))
