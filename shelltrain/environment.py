"""Where a run runs: its device (the local rank's GPU under DDP), its seeds and threads, which stages can run
in several processes, and what summary.json records about the software and hardware its figures come from."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torchvision
from omegaconf import DictConfig

from shelltrain import distributed
from shelltrain.checks import uses_ensemble
from shelltrain.cores import usable_cores
from shelltrain.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The configured device; under DDP a CUDA device is the GPU of this process's local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    if name.startswith("cuda") and distributed.active():
        return torch.device("cuda", distributed.local_rank())
    if name == "cuda":
        index = job_gpu(torch.cuda.device_count())
        if index is not None:
            torch.cuda.set_device(index)  # what else asks for "cuda" lands on this job's GPU too
            return torch.device("cuda", index)
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool, threads: int | None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    threads = threads or share_of_cores() or quota_threads()
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fastest kernels for fixed input shapes


def share_of_cores() -> int | None:
    """A launcher running N jobs at once (hydra.launcher.n_jobs, joblib) gives each job cores // N threads, not
    every core each (N jobs with all cores each ran 17x slower than with one thread each); None outside one."""
    at_once = jobs_at_once()
    return None if at_once is None else max(1, usable_cores() // at_once)


def quota_threads() -> int | None:
    """trainer.threads=null outside a parallel sweep: one thread per core this process may use, when that is
    fewer than torch's default. torch follows the affinity mask (taskset, a SLURM allocation) but not a cgroup's CPU
    quota (docker --cpus, a Kubernetes CPU limit): with one thread per core of the host, the threads wait on each
    other for the quota's time slices. None keeps torch's default."""
    usable = usable_cores()
    return usable if usable < torch.get_num_threads() else None


def job_gpu(gpus: int) -> int | None:
    """The GPU of this job when a launcher runs several jobs at once (hydra.launcher.n_jobs) and the machine has
    several: sweep job k takes GPU k mod `gpus` (round-robin by hydra.job.num), so parallel jobs spread over the
    GPUs instead of all landing on cuda:0. None (the current device) otherwise."""
    if gpus < 2 or jobs_at_once() is None:
        return None
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().get("job", {}).get("num") or 0) % gpus


def jobs_at_once() -> int | None:
    """How many jobs the sweep's launcher runs at once (hydra.launcher.n_jobs; joblib's -1 is all cores, -2 all but
    one); None outside a launcher that runs several."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    n_jobs = HydraConfig.get().get("launcher", {}).get("n_jobs")
    if not isinstance(n_jobs, int) or n_jobs == 1 or n_jobs == 0:
        return None
    return max(1, usable_cores() + 1 + n_jobs) if n_jobs < 0 else n_jobs


def check_distributable(cfg: DictConfig) -> None:
    """Stages that run in one process only refuse DDP with one line (they would repeat on every rank)."""
    if cfg.task != "train":
        raise UserError(f"task={cfg.task} runs in one process; start it without torchrun or trainer.devices")
    one_process = (
        ("cv.folds", bool(cfg.cv.folds)),
        ("prune", cfg.prune.name != "none"),
        ("ensemble", uses_ensemble(cfg)),
    )
    for key, on in one_process:
        if on:
            raise UserError(
                f"{key} is not supported with several processes (torchrun or trainer.devices > 1); "
                "run it in one process"
            )
    if cfg.trainer.sync_batchnorm and resolve_device(cfg.trainer.device).type != "cuda":
        raise UserError(
            "trainer.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm has no CPU "
            "implementation); drop it for CPU processes"
        )


def provenance(device: torch.device | str, run_dir: Path) -> dict[str, str | int]:
    """What every summary.json records about where its figures were made."""
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),  # the share of a parallel sweep's job (share_of_cores)
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "run_dir": str(run_dir),
    }
