"""Every random number generator a run draws from, as a snapshot a checkpoint stores (weights_only-loadable) and
resuming restores, so a continued run draws exactly what the uninterrupted one would have drawn."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

EPOCH_STRIDE = 100_003  # consecutive epochs of a run draw from seed * stride + epoch
RANK_STRIDE = 1_000_003  # rank r draws from its epoch's seed + r * stride


def epoch_seed(seed: int, epoch: int | None, rank: int = 0) -> int:
    """The seed of what an epoch draws on `rank` (order, augmentation, dropout): a function of (seed, epoch, rank),
    so a run resumed at an epoch replays it. `epoch` None: the same seed every epoch (trainer.overfit_batches)."""
    base = seed if epoch is None else seed * EPOCH_STRIDE + epoch
    return base + RANK_STRIDE * rank


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
