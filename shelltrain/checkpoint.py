"""Checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, written atomically.

Everything loads with `torch.load(weights_only=True)`; nothing is a pickled module or object.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shelltrain.engine import Callback, TrainState
from shelltrain.errors import UserError
from shelltrain.optim import Schedule


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a shelltrain checkpoint safely; a corrupt or foreign file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated, corrupt or unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint '{path}' cannot be loaded safely (corrupt, truncated or not a shelltrain checkpoint): {reason[:200]}"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"checkpoint '{path}' is not a shelltrain checkpoint (no 'model' state dict)")
    return payload


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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer(Callback):
    """Writes checkpoints/last.pt after every epoch and best.pt when the monitored metric improves."""

    def __init__(
        self,
        directory: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule | None,
        scaler: torch.amp.GradScaler,
        extra: dict[str, Any],
    ):
        self.directory = directory
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.scaler = scaler
        self.extra = extra  # config, classes, ...: whatever rebuilds the model and explains the run

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        payload = self.payload(state)
        save_checkpoint(payload, self.directory / "last.pt")
        if improved:
            save_checkpoint(payload, self.directory / "best.pt")

    def payload(self, state: TrainState) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.scheduler.state_dict() if self.schedule else None,
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "train_state": asdict(state),
            "metrics": state.history[-1] if state.history else {},
            "rng": rng_state(),
            **self.extra,
        }
