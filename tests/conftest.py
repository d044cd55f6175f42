"""Shared test helpers: compose configs with Hydra's compose API and run the runner in-process,
or run the real `shelltrain` command as a subprocess (a fresh interpreter, or a fork of a preloaded one)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

if os.environ.get("PYTEST_XDIST_WORKER"):  # one test process per core: one thread each, no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch at import, here and in the CLI subprocesses

# In-process runs stay on the CPU with no loader worker processes, and draw no pictures (tests about the
# pictures say plots=true).
FAST = ["trainer.device=cpu", "data.num_workers=0", "plots=false"]


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=[*FAST, *overrides], return_hydra_config=True)


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    """One job in this process, as the CLI runs it (`cli.run_in_dir`), on the CPU; returns its summary.json."""
    from shelltrain.cli import run_in_dir

    return run_in_dir(run_dir, *FAST, *overrides)


def cli_environment(extra: dict | None = None) -> dict[str, str]:
    """The environment tests run the command in: this one plus `extra`, warnings off, and one-line errors (never
    HYDRA_FULL_ERROR's tracebacks)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def shelltrain(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command line, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "shelltrain", *args],
        cwd=cwd,
        env=cli_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_shelltrain(*args: str, cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """The real command line started in the background (signal and concurrency tests talk to it while it runs);
    `new_session` gives it a process group of its own, so a test can find and clean up every process of it."""
    return subprocess.Popen(
        [sys.executable, "-m", "shelltrain", *args],
        cwd=cwd,
        env=cli_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


# A server process that imports shelltrain's stages once, then forks one child per command (multiprocessing's
# forkserver). Forking the test process itself would not do: after a test has trained in it, a fork can neither
# run backward (autograd's threads) nor use OpenMP (libgomp's threads), and the child hangs or fails.
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["shelltrain.cli", "shelltrain.jobs", "sklearn.datasets"])


def shelltrain_forked(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The same command line in a process forked from a server that has imported torch and torchvision already:
    a process of its own (exit code, stdout, stderr) without the ~8 s of CPU a fresh interpreter spends on those
    imports. Start-up itself (what is imported before the first error) is what `shelltrain` tests."""
    with tempfile.TemporaryDirectory() as streams:
        out, err = Path(streams) / "stdout", Path(streams) / "stderr"
        child = _FORKSERVER.Process(target=_cli_child, args=(args, cwd, out, err, cli_environment()))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["shelltrain", *args], timeout)
        return subprocess.CompletedProcess(["shelltrain", *args], child.exitcode, out.read_text(), err.read_text())


def _cli_child(args: tuple[str, ...], cwd: Path, out: Path, err: Path, env: dict[str, str]) -> None:
    from shelltrain.start import main

    for path, fd in ((out, 1), (err, 2)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    os.environ.clear()  # this test's environment, not the server's
    os.environ.update(env)
    warnings.simplefilter("ignore")  # PYTHONWARNINGS=ignore is read only when an interpreter starts
    os.chdir(cwd)
    sys.argv = ["shelltrain", *args]
    main()  # multiprocessing turns SystemExit(code) into this process's exit code


def interrupt_at_step(monkeypatch, step: int, how: str) -> None:
    """After optimizer step `step`: send this process SIGINT (the real handler stops the run), or crash
    as a killed process would (after a periodic mid-epoch checkpoint)."""
    from shelltrain import engine  # torch: only in the tests that train

    real = engine._optimizer_step
    count = {"steps": 0}

    def stepping(*args, **kwargs):
        real(*args, **kwargs)
        count["steps"] += 1
        if count["steps"] == step:
            if how == "sigint":
                signal.raise_signal(signal.SIGINT)
            else:
                raise RuntimeError("simulated crash")

    monkeypatch.setattr(engine, "_optimizer_step", stepping)
