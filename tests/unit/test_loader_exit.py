"""Loader workers at exit."""

from __future__ import annotations


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
