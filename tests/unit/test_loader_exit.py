"""Loader workers at exit, and the private parts of torch's DataLoader that data/loader.py relies on."""

from __future__ import annotations

import multiprocessing

import torch
from torch.utils.data import DataLoader


def test_persistent_loader_workers_are_killed_at_exit():
    """They ignore the SIGTERM with which multiprocessing's exit handler ends children, which then waits forever
    (a SIGTERMed run with loader workers hung at exit once workers persisted)."""
    from shelltrain.data.loader import Loader, _kill_leftover_workers

    loader = Loader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    next(iter(loader))
    workers = list(loader._iterator._workers)
    assert all(worker.is_alive() for worker in workers)
    _kill_leftover_workers()
    assert not any(worker.is_alive() for worker in workers)
    # torch's own shutdown ran first: collected later, the iterator does not wait for a lock a killed worker held
    assert loader._iterator._shutdown


def test_torch_dataloader_iterator_keeps_its_private_worker_api():
    """data/loader.py reaches into torch's multi-process DataLoader iterator, which has no public API for either:
    `_workers` (its worker processes, killed at exit and after a failed batch) and `_shutdown_workers()` (torch's own
    shutdown, called when a batch fails). When a torch release renames or removes them, this fails and says so."""
    iterator = iter(DataLoader(list(range(4)), batch_size=2, num_workers=1))
    workers = getattr(iterator, "_workers", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    fix = f"torch {torch.__version__} changed it: update data/loader.py (Loader.__iter__, stop_workers)"
    try:
        assert isinstance(workers, list) and workers, f"the DataLoader iterator has no `_workers` list; {fix}"
        assert all(isinstance(w, multiprocessing.process.BaseProcess) for w in workers), (
            f"the DataLoader iterator's `_workers` are not processes ({workers!r}); {fix}"
        )
        assert callable(shutdown), f"the DataLoader iterator has no `_shutdown_workers()`; {fix}"
        shutdown()
        assert not any(w.is_alive() for w in workers), f"`_shutdown_workers()` left workers running; {fix}"
    finally:
        for worker in workers or []:
            if worker.is_alive():
                worker.kill()
                worker.join()
