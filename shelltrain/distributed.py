"""Several processes training one model (DDP): the process group, who this process is, and the few collectives
the other stages need. Launched by `torchrun` (one process per device, on one or more nodes) or by
`trainer.devices=N`, which starts the same through torch's elastic launcher.

Every function is a no-op (or the single-process answer) when no process group is up, so the engine and the
runner call them unconditionally. Rank 0 is the only process that writes files.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def init() -> None:
    """Join the process group torchrun set up in the environment: gloo for CPU tensors, and NCCL for CUDA ones
    where CUDA exists (so trainer.device=cpu on a GPU node works too). Each process takes the GPU of its local
    rank before anything touches CUDA."""
    if dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available() and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    # A rank waiting for the others (rank 0 loading data, writing a checkpoint) must not time out early.
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def barrier() -> None:
    """Wait for every rank, then for gloo to let go of the wait's tensor, so that a process may end right after.

    A gloo worker thread drops its reference to a finished all-reduce shortly after the caller's wait returns,
    and if Python has already let go of the tensor, that drop needs the GIL. Once the interpreter is finalizing
    it cannot have it, and the process aborts (SIGABRT, "terminate called without an active exception") after a
    completed run; the group's threads outlive destroy_process_group once a DDP wrapper was built. A CPU
    all-reduce, so it goes through gloo even where CUDA tensors go through NCCL."""
    if not active():
        return
    token = torch.zeros(1)
    dist.all_reduce(token)
    deadline = time.monotonic() + 10
    while token._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (a CPU tensor goes through gloo: no GPU stream is involved)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank: every rank gets the same answer (a stop asked on one rank)."""
    if not active():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable Python values)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the others."""
    if not active():
        return [obj]
    boxes = [None] * world_size() if is_main() else None
    dist.gather_object(obj, boxes, dst=0)
    return boxes


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP sends them at the start of each
    training forward, so after it every rank has updated its own copy; evaluating with rank 0's (those that
    checkpoints hold) makes the global figures what one process computes from a checkpoint."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` itself in one process, else DDP around it. DDP broadcasts rank 0's parameters and buffers now,
    so every rank starts from the same weights."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    net.trainable_when_wrapped = _trainable(model)
    return net


def rewrap(net: nn.Module) -> nn.Module:
    """`net`, or a new DDP wrapper around its module when the trainable parameters changed since it was built
    (gradual unfreezing): DDP all-reduces only the parameters that required grad when it was made, so a layer
    unfrozen later would train apart on every rank."""
    if not isinstance(net, nn.parallel.DistributedDataParallel) or _trainable(net.module) == net.trainable_when_wrapped:
        return net
    return wrap(net.module, next(net.module.parameters()).device)


class LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm of any input rank (as SyncBatchNorm takes), with statistics of this process's batches alone."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def local_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every SyncBatchNorm (trainer.sync_batchnorm) replaced by a BatchNorm holding the same weights
    and statistics, for work one rank does alone in train mode (SWA's BatchNorm pass after training): a
    SyncBatchNorm there would wait in a collective no other rank joins. Modules are replaced in place."""
    if isinstance(model, nn.SyncBatchNorm):
        tensors = [*model.parameters(), *model.buffers()]
        where = tensors[0].device if tensors else None
        local = LocalBatchNorm(
            model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats, device=where
        )
        local.load_state_dict(model.state_dict())
        return local.train(model.training)
    for name, child in model.named_children():
        model.add_module(name, local_batchnorm(child))
    return model


def _trainable(model: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def shard(count: int) -> range:
    """This rank's share of `count` evaluation samples, none repeated (rank r takes r, r + N, ...), so sums over
    ranks are exactly the single-process sums."""
    return range(rank(), count, world_size())


def launch(processes: int, args: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node=N -m shelltrain ARGS` from inside this process: the exit code
    of the run (rank 0's when it failed, else the first failed rank's; 128 + N for a signal N)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "shelltrain", *args]))
    except ChildFailedError as exc:
        failure = exc.failures.get(0) or exc.failures[min(exc.failures)]
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
