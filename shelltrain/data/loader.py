"""DataLoaders whose workers never outlive the job and whose errors read like the main process's own.

Every loader shelltrain builds is a `Loader`. Its workers leave SIGINT and SIGTERM to the main process
(`signals.leave_stop_signals_to_main`) and die with it, even when it is SIGKILLed. An error inside a worker shuts
the iterator's workers down before it propagates, and a UserError raised there (a file that cannot be decoded)
reaches the user as its own one line, not as torch's "Caught UserError in DataLoader worker" traceback. At exit,
workers still alive (persistent ones, or an iterator a traceback keeps) are killed: they ignore the SIGTERM
with which multiprocessing ends daemonic children, so its exit handler would wait on them forever.
The settings every split's loader shares (`loader_settings`: workers, pinning, prefetch) and the train loader
(`train_loader`, with MixUp/CutMix in its workers: `MixCollate`) are built here too.
torch has no public API for an iterator's worker processes or for shutting them down, so this reads the
iterator's private `_workers` and `_shutdown_workers`; tests/unit/test_loader_exit.py fails when torch changes them.

With workers, a `SeededSampler` hands every index its own seed: a sample's augmentation is then a function of
(loader generator seed, position), whichever worker draws it and however long the workers live, so persistent
workers (kept across epochs and evaluations, as timm keeps them) replay exactly on resume.
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from shelltrain.cores import affinity_cores
from shelltrain.errors import UserError
from shelltrain.signals import leave_stop_signals_to_main

WORKER_PREFIX = "shelltrain.errors.UserError: "  # how a worker's UserError ends torch's traceback text
_with_workers: weakref.WeakSet = weakref.WeakSet()  # every DataLoader iterator of this process that started workers
AUTO_WORKERS_CAP = 8  # data.num_workers=auto: the process's cores, at most this many
PREFETCH_BATCHES = 4  # batches each loader worker prepares ahead (DataLoader's default: 2)


def worker_count(setting: int | str) -> int:
    """`data.num_workers`: a count, or "auto": the CPU cores this process may run on (its affinity), capped."""
    if setting != "auto":
        return int(setting)
    return min(affinity_cores(), AUTO_WORKERS_CAP)


class SeededSampler(Sampler):
    """Yield (index, seed) for the indices of `inner`: the order and the seeds come from a generator seeded with
    `generator`'s initial seed (the engine reseeds it every epoch), not from its consumed state, which the
    DataLoader draws worker seeds from only when it starts workers."""

    def __init__(self, inner: Sampler | None, length: int, generator: torch.Generator) -> None:
        self.inner, self.length, self.generator = inner, length, generator

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        own = torch.Generator().manual_seed(self.generator.initial_seed())
        order = (
            iter(self.inner) if self.inner is not None else iter(torch.randperm(self.length, generator=own).tolist())
        )
        seeds = torch.randint(0, 2**62, (len(self),), generator=own).tolist()
        return zip(order, seeds)

    def set_epoch(self, epoch: int) -> None:
        """A DistributedSampler inside orders by epoch; the engine calls this on the loader's sampler."""
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


def seeded(key: int | tuple[int, int]) -> int:
    """The index of a dataset key; a (index, seed) key from a SeededSampler first seeds this worker's RNG."""
    if isinstance(key, tuple):
        torch.default_generator.manual_seed(key[1])  # the CPU generator transforms draw from: torch.manual_seed
        return key[0]  # also seeds every accelerator's, ~100x the cost (~120 us a sample on this machine)
    return key


class Loader(DataLoader):
    """A DataLoader (same arguments) with shelltrain's worker policy and error handling."""

    def __init__(self, *args: Any, worker_init_fn: Any = None, **kwargs: Any) -> None:
        policy = functools.partial(leave_stop_signals_to_main, worker_init_fn, os.getpid())
        super().__init__(*args, worker_init_fn=policy, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        if getattr(iterator, "_workers", None):
            _with_workers.add(iterator)
        try:
            yield from iterator
        except (Exception, KeyboardInterrupt) as exc:
            stop_workers(iterator)
            if isinstance(exc, UserError):
                raise UserError(worker_message(str(exc))) from None
            raise


class MixCollate:
    """Collate, then MixUp/CutMix the batch into soft labels; it runs in the loader's (seeded) worker."""

    def __init__(self, mix: v2.Transform) -> None:
        self.mix = mix

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(*default_collate(batch))


def loader_settings(workers: int, persistent: bool, pin_memory: bool) -> dict:
    """The DataLoader arguments every split shares (persistence and prefetch need workers: DataLoader rejects
    them without)."""
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=bool(persistent) and workers > 0)
    if workers > 0:
        common["prefetch_factor"] = PREFETCH_BATCHES
    return common


def train_loader(
    dataset: Dataset,
    batch_size: int,
    generator: torch.Generator,
    sampler: Sampler | None,
    drop_last: bool,
    collate: Callable | None,
    common: dict,
) -> Loader:
    """The shuffled train loader; with workers, every sample gets its own seed (`SeededSampler`)."""
    if common["num_workers"] > 0:
        sampler = SeededSampler(sampler, len(dataset), generator)
    return Loader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=drop_last,
        collate_fn=collate,
        **common,
    )


def worker_message(text: str) -> str:
    """The one line of a UserError, also when torch re-raised it from a worker with the worker's traceback."""
    if "DataLoader worker" not in text.split("\n", 1)[0]:
        return text
    for line in reversed(text.strip().splitlines()):
        if line.startswith(WORKER_PREFIX):
            return line[len(WORKER_PREFIX) :]
    return text.strip().splitlines()[-1]


def stop_workers(iterator: Any) -> None:
    """Shut an iterator's workers down now (torch's own shutdown, then SIGKILL for any that did not exit)."""
    workers = getattr(iterator, "_workers", [])
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


def _kill_leftover_workers() -> None:
    """At exit (before multiprocessing's own handler, which atexit runs after this one): SIGKILL loader workers.
    Each iterator is shut down first (torch's shutdown tells its workers to stop, then marks the iterator done): a
    worker killed without it can die holding the lock of the iterator's "workers done" event, and the iterator's
    own shutdown, when it is collected later, then waits for that lock forever."""
    for iterator in list(_with_workers):
        stop_workers(iterator)


atexit.register(_kill_leftover_workers)
