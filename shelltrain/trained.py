"""The trained model of a finished shelltrain run, for evaluate, predict and export.

One function on purpose: the general `model.weights` loader (transfer learning: torchvision weights,
plain state dicts, pruned architectures) can take its place without touching its callers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import OmegaConf
from torch import nn

from shelltrain.checkpoint import load_checkpoint
from shelltrain.errors import UserError
from shelltrain.models import build_model


def load_trained_model(spec: str) -> tuple[nn.Module, dict[str, Any], Path]:
    """The model in a run directory (its checkpoints/best.pt, else last.pt) or checkpoint file, rebuilt from
    the checkpoint's config and classes, in eval mode on the CPU; with the checkpoint and its path."""
    path = Path(to_absolute_path(os.path.expanduser(spec)))
    if path.is_dir():
        found = [path / "checkpoints" / name for name in ("best.pt", "last.pt")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise UserError(
                f"model.weights: '{path}' has no checkpoints/best.pt or last.pt; give a run directory or a .pt file"
            )
        path = found[0]
    checkpoint = load_checkpoint(path)
    config, classes = checkpoint.get("config"), checkpoint.get("classes")
    if not isinstance(config, dict) or "model" not in config or not isinstance(classes, list):
        raise UserError(
            f"model.weights: '{path}' has no model config and classes; it was not written by a shelltrain run"
        )
    channels = (checkpoint.get("preprocessing") or {}).get("channels") or next(
        (t.shape[1] for t in checkpoint["model"].values() if t.ndim == 4), 3  # the first convolution's input planes
    )
    model = build_model(OmegaConf.create(config["model"]), len(classes), channels)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"model.weights: '{path}' does not fit the model its config builds ({reason})") from None
    return model.eval(), checkpoint, path
