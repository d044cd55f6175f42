"""The trained model of a finished shelltrain run, for evaluate, predict and export.

It goes through the `model.weights` loader (shelltrain.transfer), so every architecture a run can save,
pruned and quantized ones included, is rebuilt here exactly as it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from shelltrain.errors import UserError
from shelltrain.models import build_model
from shelltrain.transfer import load_weights, open_weights


def load_trained_model(spec: str) -> tuple[nn.Module, dict[str, Any], Path]:
    """The model in a run directory (its checkpoints/best.pt, else last.pt) or checkpoint file, rebuilt from
    the checkpoint's config and classes, in eval mode on the CPU; with the checkpoint and its path."""
    source = open_weights(OmegaConf.create({"weights": spec}))
    checkpoint = source.checkpoint if source is not None else None
    config, classes = (checkpoint or {}).get("config"), (checkpoint or {}).get("classes")
    if not isinstance(config, dict) or "model" not in config or not isinstance(classes, list):
        where = source.origin if source is not None else spec
        raise UserError(
            f"model.weights: '{where}' has no model config and classes; it was not written by a shelltrain run"
        )
    assert checkpoint is not None and source is not None
    channels = (checkpoint.get("preprocessing") or {}).get("channels") or next(
        (t.shape[1] for t in checkpoint["model"].values() if t.ndim == 4), 3  # the first convolution's input planes
    )
    model = build_model(OmegaConf.create(config["model"]), len(classes), channels)
    model, _ = load_weights(model, source, strict=True, classes=list(classes))
    return model.eval(), checkpoint, Path(source.origin)
