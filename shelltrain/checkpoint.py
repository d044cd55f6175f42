"""Checkpoint files: plain dicts of tensors, numbers, strings, lists and dicts, saved, loaded and refused here;
the Checkpointer callback writes them while training. Resuming from one is resume.py's.

Everything loads with `torch.load(weights_only=True)`; nothing is a pickled module or object. Every write goes
through rundir.write_atomic, so a process killed at any moment (SIGKILL, power loss, a full disk) leaves the
previous checkpoint intact; the Checkpointer's epoch-end files are written in the background (checkpoint_writer).
"""

from __future__ import annotations

import math
import re
import stat
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from shelltrain import distributed, rundir
from shelltrain.checkpoint_writer import CheckpointWriter
from shelltrain.engine import Callback, NonFiniteLoss, TrainState, monitor_mode
from shelltrain.errors import UserError
from shelltrain.optim import Schedule
from shelltrain.rng import rng_state
from shelltrain.rundir import best_checkpoint, epoch_checkpoint, epoch_checkpoints, last_checkpoint, write_atomic

ZIP_MAGIC = b"PK\x03\x04"  # every torch.save file since PyTorch 1.6 is a zip archive


def save_checkpoint(payload: dict[str, Any] | rundir.FileBytes, path: Path) -> None:
    """Serialize (unless given the file's bytes) and write atomically; a failed write raises UserError and leaves
    the previous file at `path` as it was."""
    write_atomic(serialize(payload) if isinstance(payload, dict) else payload, path)


def export_state_dict(model: torch.nn.Module, path: Path) -> None:
    """The trained model as a plain state dict (CPU tensors, no shelltrain keys): what a script's
    `torch.save(model.state_dict(), "model.pth")` writes, for code that builds the model itself."""
    save_checkpoint({key: value.detach().cpu() for key, value in model.state_dict().items()}, path)


def serialize(payload: dict[str, Any]) -> list[bytes]:
    """The torch.save archive of `payload` in the pieces torch.save wrote, in order: a snapshot (each tensor's
    bytes copied once) that rundir.write_atomic writes as one file. Pieces rather than one growing BytesIO, which
    copied and page-faulted a 90 MB buffer every epoch: 66-91 ms against 26-39 ms for a resnet18 checkpoint."""
    pieces = _Pieces()
    torch.save(payload, pieces)
    return pieces.parts


class _Pieces:
    """A write-only file that keeps a copy of each write (torch.save hands it views of the live tensors)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        piece = bytes(data)
        self.parts.append(piece)
        return len(piece)

    def flush(self) -> None:
        """Nothing is buffered."""


def add_to_run_checkpoints(run_dir: Path, **entries: Any) -> None:
    """Add `entries` (what the test step fitted: a calibration temperature, multi-label thresholds) to the run's
    best.pt and last.pt, the checkpoints a trained model is loaded from."""
    for path in (best_checkpoint(run_dir), last_checkpoint(run_dir)):
        if path.is_file():
            write_atomic(serialize({**load_checkpoint(path), **entries}), path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a shelltrain checkpoint safely; a corrupt or foreign file is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    payload = safe_load(path, f"checkpoint '{path}'")
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        what = f"a dict with keys {_preview(list(payload))}" if isinstance(payload, dict) else type(payload).__name__
        raise UserError(
            f"checkpoint '{path}' is not a shelltrain checkpoint: it holds {what}, not a 'model' state dict"
        )
    problem = _train_state_problem(payload.get("train_state") or {})
    if problem:
        raise UserError(f"checkpoint '{path}' is not a shelltrain checkpoint: {problem}")
    return payload


def _train_state_problem(values: Any) -> str | None:
    """What in a checkpoint's train_state shelltrain did not write (a wrong type), or None."""
    if not isinstance(values, dict):
        return f"its train_state is a {type(values).__name__}, not a dict"
    kinds = {"history": list, "partial": dict, "best_metric": (int, float, type(None)), "stopped_early": bool}
    for item in fields(TrainState):
        value = values.get(item.name, getattr(TrainState(), item.name))
        kind = kinds.get(item.name, int)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"train_state.{item.name}={value!r} is not what shelltrain writes"
    return None


def safe_load(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) on the CPU; a file it refuses is a UserError starting with `what`.
    What is not a regular file holding a zip archive is refused before torch reads it: torch.load would read
    an endless or huge foreign file (/dev/zero) whole, until the out-of-memory killer ends the process."""
    check_regular_file(path, what)
    if not _looks_like_archive(path):
        size = path.stat().st_size
        raise UserError(
            f"{what} cannot be loaded safely (corrupt, truncated or not a shelltrain checkpoint): "
            f"it is not a complete PyTorch archive ({size} bytes; truncated, or not written by torch.save)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated, corrupt or unsafe files
        raise UserError(
            f"{what} cannot be loaded safely (corrupt, truncated or not a shelltrain checkpoint): "
            f"{_why_unloadable(path, exc)}"
        ) from None


def check_regular_file(path: Path, what: str) -> None:
    """Refuse a device, pipe, socket or directory (reading /dev/zero never ends) with one line."""
    if not stat.S_ISREG(Path(path).stat().st_mode):
        raise UserError(f"{what} is not a regular file (a device, pipe or directory); give a checkpoint file")


def _looks_like_archive(path: Path) -> bool:
    """torch.save's zip format, judged from the first bytes and the zip directory at the end, without reading
    the rest."""
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return False
    return zipfile.is_zipfile(path)


def _why_unloadable(path: Path, exc: Exception) -> str:
    """torch's reason, made short (and never the advice to load with weights_only=False)."""
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return f"it holds a pickled Python object ({unsafe.group(1)}), which a weights-only load refuses to run"
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return _whole_sentences(detail.group(1) if detail else _first_line(exc))


def _whole_sentences(text: str, limit: int = 200) -> str:
    """`text` cut to at most `limit` characters at a sentence end (at a word with "..." when none fits), never
    mid-sentence."""
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    if end > 0:
        return text[: end + 1]
    return text[: text.rfind(" ", 0, limit - 3)].rstrip(" ,;:") + "..."


def peek(path: Path) -> dict[str, Any] | None:
    """A checkpoint's dict read without materializing its tensors (memory-mapped), for its position, config or
    overrides; None when it is unreadable or not a dict (loading it properly says why)."""
    if not Path(path).is_file() or not _looks_like_archive(Path(path)):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for truncated, corrupt or unsafe files
        return None
    return payload if isinstance(payload, dict) else None


def load_model_state(saved: dict[str, Any], path: Path, model: torch.nn.Module, config: Any) -> None:
    """Load a checkpoint's model state; a mismatch names the keys and shapes, and the model it was trained with."""
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


class NonFiniteState(NonFiniteLoss):
    """An optimizer step made the weights (or the optimizer's state) NaN or infinite."""

    def __init__(self, where: str, epoch: int, step: int):
        self.value, self.epoch, self.step = math.nan, epoch, step
        UserError.__init__(self, f"{where} became NaN or infinite at epoch {epoch}, step {step}")


def non_finite_entry(model_state: dict[str, Any], optimizer_state: dict[Any, Any]) -> str | None:
    """The first floating tensor of a model's or optimizer's state that holds NaN or infinity, named for a
    message ("the model's features.0.weight"), else None; one host sync for all of them."""
    named = [(f"the model's {k}", v) for k, v in model_state.items() if torch.is_tensor(v)]
    for index, values in optimizer_state.items():
        named += [(f"the optimizer's {k} of parameter {index}", v) for k, v in values.items() if torch.is_tensor(v)]
    named = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    # One pass per tensor with no temporary: a NaN or infinity anywhere makes the sum non-finite. A sum of finite
    # values can overflow too, so only the tensors whose sum is non-finite get the exact element-wise check.
    sums = torch.stack([t.detach().sum().float().to(named[0][1].device) for _, t in named])  # Adam's step: CPU
    suspects = torch.nonzero(~torch.isfinite(sums)).flatten().tolist()  # one host sync
    return next((named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())), None)


class Checkpointer(Callback):
    """Writes checkpoints/last.pt after every epoch (and every N steps mid-epoch), best.pt when the
    monitored metric improves, and keeps `keep` epoch_NNN.pt files: the best epochs by that metric.

    Under DDP every rank has one (each hands in its RNG state, so a mid-epoch checkpoint resumes every rank
    exactly) and only the one with `write` (rank 0) writes. The files are written in the background while the
    next epoch trains; used as a context manager around training, it returns once they are all on disk."""

    def __init__(
        self,
        run_dir: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule | None,
        scaler: torch.amp.GradScaler,
        extra: dict[str, Any],
        monitor: str = "val_acc",
        keep: int = 0,
        write: bool = True,
        averager: Any = None,
        swa: Any = None,
    ):
        self.run_dir = run_dir
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.scaler = scaler
        self.extra = extra  # config, classes, ...: whatever rebuilds the model and explains the run
        self.monitor = monitor
        self.keep = keep
        self.write = write
        self.averager = averager  # averaging.EmaAverager or None: its state travels in every checkpoint
        self.swa = swa  # averaging.SwaAverager or None: likewise
        self.best_model: dict[str, torch.Tensor] | None = None  # best.pt's weights, kept in memory (rank 0)
        self.writer = CheckpointWriter()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.wait()  # also when training failed: what was handed to the writer is a good checkpoint

    def on_epoch_end(self, state: TrainState, row: dict[str, float], improved: bool) -> None:
        self._refuse_non_finite(epoch=state.epoch, step=state.step)
        payload = self.payload(state)
        if not self.write:
            return
        data = serialize(payload)  # the snapshot: training goes on while the writer thread writes these bytes
        self.writer.wait()  # the previous epoch's files are on disk before _retain looks at them
        last = last_checkpoint(self.run_dir)
        # last.pt first: a crash before best.pt leaves last.pt selecting its own epoch, from which a resume rebuilds
        # best.pt (best_repair); best.pt first could leave it ahead of last.pt with the previous best model gone.
        files: list[tuple[rundir.FileBytes | Path, Path]] = [(data, last)]
        if improved:
            best = self._best(payload, data)
            files.append((last if best is data else best, best_checkpoint(self.run_dir)))  # same bytes: a hard link
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self._best_state(payload).items()}
        if self.keep > 0:
            files += self._retain(state, last)
        self.writer.submit(files)

    def on_checkpoint(self, state: TrainState) -> None:
        self._refuse_non_finite(epoch=state.epoch + 1, step=state.step)  # mid-epoch: within the next epoch
        payload = self.payload(state)
        if self.write:
            self.writer.submit([(serialize(payload), last_checkpoint(self.run_dir))])

    def _best(self, payload: dict[str, Any], data: list[bytes]) -> list[bytes]:
        """best.pt holds the model trainer.monitor selected: the averaged weights when it is an ema_ metric."""
        if not self.monitor.startswith("ema_"):
            return data
        return serialize(as_best(payload, self.monitor))

    def _best_state(self, payload: dict[str, Any]) -> dict[str, torch.Tensor]:
        return as_best(payload, self.monitor)["model"]

    def _refuse_non_finite(self, epoch: int, step: int) -> None:
        """Never write a checkpoint whose weights or optimizer state hold NaN or infinity: the loss is checked
        before each step, so the step that ruins the weights is only seen here. Stops the run like a non-finite
        loss, with last.pt still the last finite checkpoint. Every rank checks (DDP keeps the weights equal)."""
        where = non_finite_entry(self.model.state_dict(), self.optimizer.state_dict()["state"])
        if where is not None:
            raise NonFiniteState(where, epoch, step)

    def _retain(self, state: TrainState, last: Path) -> list[tuple[rundir.FileBytes | Path, Path]]:
        """Keep the `keep` best epoch checkpoints (ties: the earlier epoch), deleting the rest; this epoch's file,
        when kept, is a hard link to last.pt's bytes (returned for the writer)."""
        existing = epoch_checkpoints(self.run_dir)
        candidates = sorted({*existing, state.epoch}, key=lambda e: self._rank(state, e))
        kept = set(candidates[: self.keep])
        for epoch, path in existing.items():
            if epoch not in kept:
                path.unlink(missing_ok=True)
        return [(last, epoch_checkpoint(self.run_dir, state.epoch))] if state.epoch in kept else []

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
        training = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.scheduler.state_dict() if self.schedule else None,
            "scaler": self.scaler.state_dict(),
        }
        averages = {
            **({"ema": self.averager.state_dict()} if self.averager is not None else {}),
            **({"swa": self.swa.state_dict()} if self.swa is not None else {}),
            **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
        }
        return checkpoint_payload(self.model.state_dict(), state, rngs[0], {**averages, **self.extra}, **training)


def checkpoint_payload(
    model_state: dict[str, Any],
    state: TrainState,
    rng: dict[str, Any],
    extra: dict[str, Any],
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one layout of a checkpoint: the model's state, the optimizer, schedule and scaler states (None where a
    checkpoint carries none, e.g. a pruned model's), the training position and history, the RNG state, and `extra`
    (config, classes, pruning history: whatever rebuilds the model and explains the run)."""
    return {
        "model": model_state,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "epoch": state.epoch,
        "step": state.step,
        "train_state": asdict(state),
        "metrics": state.history[-1] if state.history else {},
        "rng": rng,
        **extra,
    }


def averaged_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's own state dict inside an AveragedModel's (which prefixes `module.` and adds `n_averaged`), as a
    checkpoint's `ema` and `swa` entries hold it."""
    return {key.removeprefix("module."): value for key, value in state.items() if key.startswith("module.")}


def as_best(payload: dict[str, Any], monitor: str) -> dict[str, Any]:
    """A checkpoint as best.pt holds it: the model trainer.monitor selects, i.e. the averaged weights (its `ema`
    entry) when the monitor is an ema_ metric, else the payload as it is."""
    if not monitor.startswith("ema_") or payload.get("ema") is None:
        return payload
    return {**payload, "model": averaged_weights(payload["ema"])}


def model_checkpoint(model_state: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A trained model alone, without training state (checkpoints/ema.pt and swa.pt): its weights and `extra`
    (config, classes, preprocessing, pruning history), which is all trained.open_trained needs."""
    return {"model": model_state, **extra}
