"""`output.mirror`: a finished run directory copied to an s3:// (or any fsspec) prefix. The run writes only to its
local run directory while it runs (checkpoints, logs, resume all stay local); once the job has finished, rank 0
copies every file to <output.mirror>/<the run directory's path under the launch folder, else its name>, e.g.
s3://bucket/runs/outputs/2026-12-07/20-11-00-123456/. Credentials are the fsspec library's own (remote.py): none is
written anywhere."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from shelltrain import distributed, remote
from shelltrain.console import say
from shelltrain.dataroot import user_path


def mirror_name(run_dir: Path) -> str:
    """Where under the prefix a run directory goes: its path relative to where the run was launched (outputs/DATE/
    TIME, multirun/DATE/TIME/N), or its name when it lies elsewhere."""
    run_dir, launched = run_dir.absolute(), user_path(".")
    return run_dir.relative_to(launched).as_posix() if run_dir.is_relative_to(launched) else run_dir.name


def mirror_run(output: DictConfig, run_dir: Path, console: Console) -> None:
    """Copy the finished `run_dir` to output.mirror (nothing when it is null; rank 0 only under DDP)."""
    if output.mirror is None or not distributed.is_main():
        return
    target = f"{str(output.mirror).rstrip('/')}/{mirror_name(run_dir)}"
    copied = remote.upload(run_dir, target, "output.mirror")
    say(console, f"output.mirror: copied the run directory ({copied} files) to {target}")
