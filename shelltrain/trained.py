"""The trained model of a finished shelltrain run, for evaluate, predict, export and ensemble members.

One function on purpose: the model is rebuilt from the checkpoint's own config and classes, its architecture
changed as the checkpoint records (pruned, quantized) by the `model.weights` loader's `rebuild_architecture`,
then its weights are loaded exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import OmegaConf
from torch import nn

from shelltrain import rundir
from shelltrain.calibration import with_temperature
from shelltrain.checkpoint import load_checkpoint
from shelltrain.errors import UserError
from shelltrain.models import build_model
from shelltrain.prune.quantize import quiet
from shelltrain.transfer import checkpoint_source, rebuild_architecture


def load_trained_model(spec: str, key: str = "model.weights") -> tuple[nn.Module, dict[str, Any], Path]:
    """The model in a run directory (its checkpoints/best.pt, else last.pt) or checkpoint file, rebuilt from
    the checkpoint's config and classes, in eval mode on the CPU; with the checkpoint and its path.
    `key` is the config key that named it, for error messages."""
    path = Path(to_absolute_path(os.path.expanduser(spec)))
    ensemble = rundir.ensemble_dir(path)
    if ensemble is not None and not rundir.best_checkpoint(ensemble).is_file():
        return load_fused_model(ensemble, key)
    if path.is_dir():
        found = [p for p in (rundir.best_checkpoint(path), rundir.last_checkpoint(path)) if p.is_file()]
        if not found:
            best = rundir.best_checkpoint(Path()).as_posix()
            raise UserError(f"{key}: '{path}' has no {best} or {rundir.LAST}; give a run directory or a .pt file")
        path = found[0]
    with quiet():  # an int8 checkpoint's tensors warn when loaded
        checkpoint = load_checkpoint(path)
    config, classes = checkpoint.get("config"), checkpoint.get("classes")
    if not isinstance(config, dict) or "model" not in config or not isinstance(classes, list):
        raise UserError(f"{key}: '{path}' has no model config and classes; it was not written by a shelltrain run")
    channels = (checkpoint.get("preprocessing") or {}).get("channels") or next(
        (t.shape[1] for t in checkpoint["model"].values() if t.ndim == 4),
        3,  # the first convolution's input planes
    )
    model = build_model(OmegaConf.create({**config["model"], "weights": None}), len(classes), channels)
    model = rebuild_architecture(model, checkpoint_source(spec, path, checkpoint))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"{key}: '{path}' does not fit the model its config builds ({reason})") from None
    return with_temperature(model.eval(), checkpoint.get("temperature")), checkpoint, path  # trainer.calibrate


def load_fused_model(directory: Path, key: str = "model.weights") -> tuple[nn.Module, dict[str, Any], Path]:
    """An ensemble run directory as one model (fusion.FusedModel: its members, rule and weights as saved in
    ensemble.json), with a checkpoint-like dict of the classes and preprocessing its members share."""
    from shelltrain.fusion import FusedModel
    from shelltrain.members import read_ensemble

    report = read_ensemble(directory)
    members, checkpoints = [], []
    for member in report["members"]:
        model, checkpoint, _ = load_trained_model(str(directory / member["checkpoint"]), key)
        members.append(model)
        checkpoints.append(checkpoint)
    first = checkpoints[0]
    for name in ("classes", "preprocessing"):
        if any(c.get(name) != first.get(name) for c in checkpoints[1:]):
            raise UserError(
                f"{key}: the members of the ensemble '{directory}' differ in their {name}; "
                "use one member's run directory instead"
            )
    fused = FusedModel(members, report["rule"], report["weights"])
    info = {"classes": first["classes"], "preprocessing": first.get("preprocessing"), "config": first["config"]}
    return fused.eval(), info, directory / rundir.ENSEMBLE_REPORT
