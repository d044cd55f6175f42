"""best.pt agrees with last.pt: a run that resumes checks that checkpoints/best.pt holds the epoch last.pt's history
selects, and rebuilds it when a crash came between an epoch end's two writes.

The Checkpointer writes last.pt first and best.pt second. A crash between them leaves a last.pt whose history
selects its own epoch and a best.pt one improvement behind; the model best.pt should hold is then last.pt's own
(the averaged weights when trainer.monitor is an ema_ metric), so the repair is always possible. The opposite order
could leave a best.pt ahead of last.pt with the previous best model gone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shelltrain import rundir
from shelltrain.checkpoint import as_best, load_checkpoint, peek, save_checkpoint
from shelltrain.engine import TrainState
from shelltrain.errors import UserError

log = logging.getLogger("shelltrain")


def repair_best(run_dir: Path, last: dict[str, Any]) -> str | None:
    """Make `run_dir`'s best.pt the model of the epoch that `last` (the checkpoint the run resumes from) selects.
    Returns the line that says what was rebuilt, or None when best.pt already agreed (or there is none to hold)."""
    if last.get("pruning") is not None:
        return None  # after pruning, best.pt and last.pt are the same pruned model
    state = TrainState.from_dict(last.get("train_state") or {})
    if not state.best_epoch:
        return None
    path = rundir.best_checkpoint(run_dir)
    found = peek(path)
    if found is not None and int(found.get("epoch", -1)) == state.best_epoch and found.get("pruning") is None:
        return None
    source = _checkpoint_of_epoch(run_dir, last, state)
    if source is None:
        was = f"of epoch {found.get('epoch')}" if found is not None else "missing or unreadable"
        raise UserError(
            f"checkpoint '{path}' is {was}, but last.pt selects epoch {state.best_epoch} and no checkpoint of that "
            "epoch is left to rebuild it; resume from an epoch checkpoint (trainer.resume=FILE) or start a new run"
        )
    monitor = str(((last.get("config") or {}).get("trainer") or {}).get("monitor", ""))
    save_checkpoint(as_best(source, monitor), path)
    held = "no model" if found is None else f"epoch {found.get('epoch')}"
    line = (
        f"checkpoints/best.pt held {held} while last.pt selects epoch {state.best_epoch} (a crash between the two "
        "writes): rebuilt it from that epoch"
    )
    log.warning(line)
    return line


def _checkpoint_of_epoch(run_dir: Path, last: dict[str, Any], state: TrainState) -> dict[str, Any] | None:
    """The checkpoint taken at the end of the selected epoch: last.pt itself, or a kept epoch_NNN.pt."""
    if state.epoch == state.best_epoch and state.batch == 0:
        return last
    kept = rundir.epoch_checkpoints(run_dir).get(state.best_epoch)
    if kept is None:
        return None
    payload = load_checkpoint(kept)
    return payload if int(payload.get("epoch", -1)) == state.best_epoch else None
