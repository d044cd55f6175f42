"""Several processes for one job: under torchrun (every rank runs the command), or trainer.devices=N (this
process starts N through torch's elastic launcher).

Free of torch at import: the environment torchrun sets says which process this is, and the process group
is joined only once a job runs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from shelltrain import rundir
from shelltrain.errors import EXIT_USER_ERROR, UserError
from shelltrain.sweep import EXIT_GATE_FAILED

log = logging.getLogger("shelltrain")
_followers_waiting = False  # rank 0 under torchrun, until it has told the other ranks where the run goes


def under_torchrun() -> bool:
    """One of several processes started by torchrun (or by trainer.devices), read without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def follower() -> bool:
    """A rank other than 0: it trains, but writes no files and prints nothing of its own."""
    return under_torchrun() and os.environ.get("RANK", "0") != "0"


def run_as_rank(task: Callable[[], Any]) -> None:
    """Under torchrun, every rank runs this command (`task`, the Hydra entry point). Hydra would give each its
    own `${now:...}` run directory, so rank 0 composes the job as usual and, once it has settled the run
    directory (and the checkpoint a resume starts from), broadcasts them; the other ranks then compose the
    same job into that directory with Hydra's own files and logging turned off."""
    from shelltrain import distributed

    global _followers_waiting
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        if not follower():
            sys.stderr.write(
                "shelltrain: error: a multirun sweep cannot run under torchrun; sweep with trainer.devices=N "
                "instead, which starts the processes of each job itself\n"
            )
        sys.exit(EXIT_USER_ERROR)
    distributed.init()
    try:
        if follower():
            decision = distributed.broadcast(None)
            if "exit" in decision:  # rank 0 ended before training (--help, --cfg, a config error): so do we
                distributed.barrier()
                sys.exit(decision["exit"])
            sys.argv[1:] = [
                *into_run(sys.argv[1:], decision["run_dir"], decision["resume"]),
                "hydra.output_subdir=null",
                "hydra/job_logging=none",
                "hydra/hydra_logging=none",
            ]
            task()
            distributed.barrier()  # until rank 0 has written its records; then end safely
            return
        _followers_waiting = True
        code: Any = 1
        try:
            task()
            code = 0
        except SystemExit as exc:
            code = exc.code
            raise
        finally:
            ended_early = _followers_waiting
            if ended_early:
                tell_followers({"exit": code if isinstance(code, int) else int(code is not None)})
            if ended_early or code in (0, EXIT_GATE_FAILED):
                distributed.barrier()  # the ranks end together, and safely (distributed.barrier says why)
    finally:
        distributed.shutdown()


def tell_followers(decision: dict[str, Any]) -> None:
    """Rank 0: give the waiting ranks the run directory and checkpoint (or the exit code); once only."""
    global _followers_waiting
    if not _followers_waiting:
        return
    from shelltrain import distributed

    _followers_waiting = False
    distributed.broadcast(decision)


def into_run(args: list[str], run_dir: str, resume: str | None) -> list[str]:
    """A command line made to continue in `run_dir` from the checkpoint `resume` (None: from scratch), where
    a resume already settled on lands without moving or searching again."""
    kept = [a for a in args if not is_override_of(a, "trainer.resume") and not is_override_of(a, "hydra.run.dir")]
    return [*kept, f"trainer.resume={_quoted(resume) if resume else 'null'}", f"hydra.run.dir={_quoted(run_dir)}"]


def launch_processes(
    cfg: DictConfig, run_dir: Path, checkpoint: str | None, overrides: list[str]
) -> tuple[Any, list[str]]:
    """trainer.devices=N: run this job in N processes on this machine (torchrun --standalone), into this job's run
    directory. The processes print and record everything themselves (errors, gates, how to resume); this one
    passes on their exit code, or in a sweep returns the score from the summary.json they wrote."""
    from shelltrain import distributed

    processes = int(cfg.trainer.devices)
    args = into_run(_config_flags(HydraConfig.get()) + overrides, str(run_dir), checkpoint)
    message = f"trainer.devices={processes}: training in {processes} processes (DDP) into {run_dir}"
    print(message)
    log.info(message)
    code = distributed.launch(processes, args)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if code not in (0, EXIT_GATE_FAILED):
        if multirun:
            raise UserError(f"the {processes} training processes ended with exit code {code} (see their output)")
        sys.exit(code)
    if code == EXIT_GATE_FAILED and not multirun:
        sys.exit(code)
    summary = rundir.read_json(rundir.summary(run_dir))
    return summary.get(f"best_{cfg.trainer.monitor}", summary.get("test_acc")), []


def torchrun_command() -> list[str]:
    """The launcher part of a command line that starts this job's processes again (torchrun's, as started)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = int(os.environ["WORLD_SIZE"]) // per_node
    return [
        "torchrun",
        *([f"--nnodes={nodes}"] if nodes > 1 else []),
        f"--nproc-per-node={per_node}",
        "-m",
        "shelltrain",
    ]


def is_override_of(arg: str, key: str) -> bool:
    return arg.lstrip("+~").split("=", 1)[0] == key


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
