"""Checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, written atomically.

Everything loads with `torch.load(weights_only=True)`; nothing is a pickled module or object.
A write goes to a temporary file in the same directory, is fsynced and renamed over the old file, so a
process killed at any moment (SIGKILL, power loss, a full disk) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shelltrain import distributed
from shelltrain.engine import Callback, TrainState, monitor_mode, restore_rng, rng_state
from shelltrain.errors import UserError
from shelltrain.optim import Schedule
from shelltrain.rundir import BEST, LAST, write_atomic

__all__ = [
    "Checkpointer",
    "load_checkpoint",
    "safe_load",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
    "restore_training",
    "resolve_resume",
    "find_resumable",
    "checkpoint_position",
    "Resume",
]


@dataclass
class Resume:
    """Where a run resumes from: a checkpoint (already loaded: a bad file fails before any data loads), and
    whether the run continues in that checkpoint's own run directory (False: a new run directory starts
    from it, e.g. from an older checkpoint of a run). An ensemble resumes from its run directory (`checkpoint`),
    its members one by one."""

    checkpoint: Path
    in_place: bool
    payload: dict[str, Any] = field(default_factory=dict, repr=False)


def save_checkpoint(payload: dict[str, Any] | bytes, path: Path) -> None:
    """Serialize (unless given bytes) and write atomically; a failed write raises UserError and leaves
    the previous file at `path` as it was."""
    write_atomic(payload if isinstance(payload, bytes) else serialize(payload), path)


def serialize(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a shelltrain checkpoint safely; a corrupt or foreign file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    payload = safe_load(path, f"checkpoint '{path}'")
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        what = f"a dict with keys {_preview(list(payload))}" if isinstance(payload, dict) else type(payload).__name__
        raise UserError(
            f"checkpoint '{path}' is not a shelltrain checkpoint: it holds {what}, not a 'model' state dict"
        )
    return payload


def safe_load(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) on the CPU; a file it refuses is a UserError starting with `what`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated, corrupt or unsafe files
        raise UserError(
            f"{what} cannot be loaded safely (corrupt, truncated or not a shelltrain checkpoint): "
            f"{_why_unloadable(path, exc)}"
        ) from None


def _why_unloadable(path: Path, exc: Exception) -> str:
    """torch's reason, made short (and never the advice to load with weights_only=False)."""
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        return f"it is not a complete PyTorch archive ({size} bytes; truncated, or not written by torch.save)"
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return f"it holds a pickled Python object ({unsafe.group(1)}), which a weights-only load refuses to run"
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return (detail.group(1) if detail else _first_line(exc))[:200]


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(epoch, step) of a checkpoint, read without materializing its tensors; (-1, -1) if unreadable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(payload.get("epoch", 0)), int(payload.get("step", 0))
    except Exception:
        return -1, -1


def stored_overrides(path: Path) -> list[str] | None:
    """The command-line overrides a checkpoint's run was configured with (None: not recorded, or unreadable:
    loading it properly reports that)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    overrides = payload.get("overrides") if isinstance(payload, dict) else None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def restore_training(
    payload: dict[str, Any],
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule | None,
    scaler: torch.amp.GradScaler,
) -> TrainState:
    """Load model, optimizer, schedule and scaler state from a checkpoint; every mismatch is one line."""
    _load_model(payload["model"], path, model, payload.get("config"))
    saved_config = payload.get("config") or {}
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        was = (saved_config.get("optimizer") or {}).get("_target_", "?")
        raise UserError(
            f"checkpoint '{path}': its optimizer state ({was}) does not fit the configured optimizer "
            f"({_first_line(exc)}); resume with the optimizer settings it was trained with"
        ) from None
    saved_scheduler = payload.get("scheduler")
    if schedule is not None and saved_scheduler:
        fresh_total = getattr(schedule.scheduler, "total_steps", None)
        if fresh_total is not None and saved_scheduler.get("total_steps") not in (None, fresh_total):
            raise UserError(
                f"checkpoint '{path}': its schedule was sized for {saved_scheduler['total_steps']} steps, this "
                f"config sizes it for {fresh_total}; resume with the original trainer.epochs (and batch "
                "settings), or use a scheduler without a fixed length (e.g. scheduler=step)"
            )
        schedule.scheduler.load_state_dict(saved_scheduler)
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])  # a no-op for a disabled scaler (bf16/fp32)
    values = payload.get("train_state") or {"epoch": payload.get("epoch", 0), "step": payload.get("step", 0)}
    return TrainState.from_dict(values)


def _load_model(saved: dict[str, Any], path: Path, model: torch.nn.Module, config: Any) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shapes differ: {_preview(shapes)}")
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        trained = ""
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            model_cfg = config["model"]
            name = model_cfg.get("name") or model_cfg.get("_target_")
            trained = f" (it was trained with model={name}" + (
                f" model.width={model_cfg['width']})" if model_cfg.get("width") else ")"
            )
        raise UserError(
            f"checkpoint '{path}' does not match the configured model{trained}: {'; '.join(parts)}. "
            "Resume with the model settings it was trained with"
        )
    model.load_state_dict(saved)


def _preview(items: list[Any], n: int = 3) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Checkpointer(Callback):
    """Writes checkpoints/last.pt after every epoch (and every N steps mid-epoch), best.pt when the
    monitored metric improves, and keeps `keep` epoch_NNN.pt files: the best epochs by that metric.

    Under DDP every rank has one (each hands in its RNG state, so a mid-epoch checkpoint resumes every rank
    exactly) and only the one with `write` (rank 0) writes."""

    def __init__(
        self,
        directory: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule | None,
        scaler: torch.amp.GradScaler,
        extra: dict[str, Any],
        monitor: str = "val_acc",
        keep: int = 0,
        write: bool = True,
    ):
        self.directory = directory
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.scaler = scaler
        self.extra = extra  # config, classes, ...: whatever rebuilds the model and explains the run
        self.monitor = monitor
        self.keep = keep
        self.write = write

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        payload = self.payload(state)
        if not self.write:
            return
        data = serialize(payload)
        write_atomic(data, self.directory / LAST)
        if improved:
            write_atomic(data, self.directory / BEST)
        if self.keep > 0:
            self._retain(state, data)

    def on_checkpoint(self, state: TrainState) -> None:
        payload = self.payload(state)
        if self.write:
            write_atomic(serialize(payload), self.directory / LAST)

    def _retain(self, state: TrainState, data: bytes) -> None:
        """Keep the `keep` best epoch checkpoints (ties: the earlier epoch), deleting the rest."""
        existing = {int(p.stem.split("_")[1]): p for p in self.directory.glob("epoch_*.pt") if _is_epoch_file(p)}
        candidates = sorted({*existing, state.epoch}, key=lambda e: self._rank(state, e))
        kept = set(candidates[: self.keep])
        if state.epoch in kept:
            write_atomic(data, self.directory / f"epoch_{state.epoch:03d}.pt")
        for epoch, path in existing.items():
            if epoch not in kept:
                path.unlink(missing_ok=True)

    def _rank(self, state: TrainState, epoch: int) -> tuple[float, int]:
        rows = [r for r in state.history if int(r["epoch"]) == epoch]
        value = float(rows[-1].get(self.monitor, math.nan)) if rows else math.nan
        if math.isnan(value):
            return (math.inf, epoch)
        return (-value if monitor_mode(self.monitor) == "max" else value, epoch)

    def payload(self, state: TrainState) -> dict[str, Any]:
        """The checkpoint's contents; under DDP a collective (every rank's RNG state), empty off rank 0."""
        rngs = distributed.gather(rng_state())
        if not self.write:
            return {}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.scheduler.state_dict() if self.schedule else None,
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "train_state": asdict(state),
            "metrics": state.history[-1] if state.history else {},
            "rng": rngs[0],
            **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
            **self.extra,
        }


def _is_epoch_file(path: Path) -> bool:
    parts = path.stem.split("_")
    return len(parts) == 2 and parts[1].isdigit()


# -- finding what to resume -------------------------------------------------------------------------------


def resolve_resume(value: str | Path) -> tuple[Path, Path | None]:
    """`trainer.resume` as (checkpoint file, the run directory it belongs to or None).

    Accepts a checkpoint file, a run directory (its checkpoints/last.pt) or a run's checkpoints/ folder;
    a checkpoint belongs to a run directory when it lies in that directory's checkpoints/ folder."""
    path = Path(os.path.expanduser(str(value))).absolute()
    if path.is_file():
        return path, path.parent.parent if path.parent.name == "checkpoints" else None
    if not path.exists():
        raise UserError(f"trainer.resume: '{path}' does not exist; give a checkpoint file, a run directory or auto")
    if (path / "checkpoints" / LAST).is_file():
        return path / "checkpoints" / LAST, path
    if path.name == "checkpoints" and (path / LAST).is_file():
        return path / LAST, path.parent
    if any(path.glob(f"*/checkpoints/{LAST}")):
        raise UserError(
            f"trainer.resume: '{path}' is a multirun sweep directory; resume the sweep with "
            f"shelltrain -m <the same overrides> hydra.sweep.dir={path} trainer.resume=auto"
        )
    raise UserError(
        f"trainer.resume: '{path}' holds no checkpoints/{LAST}, so it is not a shelltrain run directory that got "
        "as far as a checkpoint; give a checkpoint file, a run directory or auto"
    )


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A composed config minus what may differ between a run and its resumption."""
    config = {k: v for k, v in config.items() if k != "hydra"}
    trainer = dict(config.get("trainer") or {})
    trainer.pop("resume", None)
    config["trainer"] = trainer
    return config


def find_resumable(root: Path, config: dict[str, Any]) -> Path | None:
    """The run directory under `root` whose checkpoints/last.pt is the newest among those trained with
    `config` (resolved; trainer.resume aside); None when there is none. The config stored in the checkpoint
    is what counts: .hydra/config.yaml is rewritten when a fixed hydra.run.dir is used again."""
    if not root.is_dir():
        return None
    wanted = comparable_config(config)
    found = []
    for last in root.rglob(LAST):
        if last.parent.name != "checkpoints" or not last.is_file():
            continue
        try:
            recorded = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("config")
        except Exception:  # unreadable or foreign: not a match
            continue
        if isinstance(recorded, dict) and comparable_config(recorded) == wanted:
            found.append((last.stat().st_mtime, str(last.parent.parent)))
    return Path(max(found)[1]) if found else None
