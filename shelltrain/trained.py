"""The trained model: what every consumer of a finished shelltrain run opens, through one function.

`open_trained(spec)` takes what a user writes in `model.weights`, `ensemble.checkpoints`, `distill.teacher` or
`ensemble.sweep` entries (a run directory, a checkpoint file, an ensemble run) and returns a `TrainedModel`: the
module (its architecture rebuilt as the checkpoint records: pruned, int8; its calibration temperature applied),
its class names, the full preprocessing it was trained with, where it may run, and what it is (kind, which
weights, where from). Evaluate, predict, export, ensemble members, the distillation teacher, the compression
stages and fine-tuning from `model.weights` all ask here, and so does every later consumer.

Which weights of a run: `RUN` is the model the run reported as its result (checkpoints/best.pt, else last.pt);
a suffix picks another: `RUN@last`, `RUN@ema` (the exponential moving average of the selected epoch, trainer.ema)
or `RUN@swa` (stochastic weight averaging with its recomputed BatchNorm statistics, trainer.swa).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from shelltrain import prune, rundir
from shelltrain.calibration import with_temperature
from shelltrain.checkpoint import load_checkpoint
from shelltrain.dataroot import user_path
from shelltrain.engine import monitor_mode
from shelltrain.errors import UserError
from shelltrain.fusion import FusedModel
from shelltrain.models import build_model
from shelltrain.multilabel import DEFAULT_THRESHOLD, is_multi_label
from shelltrain.placement import eval_settings, is_quantized
from shelltrain.preprocess import InputAdapter, Preprocessing
from shelltrain.schema import TrainerConfig
from shelltrain.schema_values import ENSEMBLE_RULES
from shelltrain.silence import quiet

WEIGHTS = ("best", "last", "ema", "swa")  # the suffixes of RUN@<weights>


@dataclass
class TrainedModel:
    """Everything inference needs about one trained model (or a fused ensemble of them)."""

    module: nn.Module  # in eval mode on the CPU; the temperature (trainer.calibrate) already applied
    classes: list[str]
    preprocessing: Preprocessing
    source: Path  # the file read (an ensemble: its ensemble.json)
    weights: str = "best"  # best | last | ema | swa: which of the run's weights
    kind: str = "model"  # model | ensemble
    config: dict[str, Any] = field(default_factory=dict)  # the config it was trained with
    checkpoint: dict[str, Any] = field(default_factory=dict)  # the payload: state dict, pruning history, ...
    temperature: float | None = None
    members: list[TrainedModel] = field(default_factory=list)  # an ensemble's
    thresholds: list[float] | None = None  # multi-label (trainer.loss=bce): per class, tuned on val; None otherwise

    @property
    def quantized(self) -> bool:
        """int8 models run on the CPU only, whatever the run's device."""
        return is_quantized(self.module)

    @property
    def name(self) -> str:
        """The architecture, for people: model.name or its _target_."""
        model = self.config.get("model", {})
        return str(model.get("name") or model.get("_target_") or "model")

    def runs_on(self, settings: TrainerConfig) -> TrainerConfig:
        """The settings it is evaluated with: the run's device, or the CPU in float32 for an int8 model."""
        return eval_settings(self.module, settings)

    def check_classes(self, classes: list[Any], key: str, fix: str) -> None:
        """The one class-set check: a model used on data must predict exactly the data's classes, in order.
        `fix` is what the user can do, in the consumer's words."""
        ours, theirs = [str(c) for c in self.classes], [str(c) for c in classes]
        if ours != theirs:
            raise UserError(
                f"{key}: the model's {len(ours)} classes (from '{self.source}') differ from the data's {len(theirs)}: "
                f"[{_brief(ours)}] ({len(ours)} classes) against [{_brief(theirs)}] ({len(theirs)} classes); {fix}"
            )

    def fed(self, given: Preprocessing, key: str, say: Any) -> nn.Module:
        """The module taking batches preprocessed as `given` (the run's data): itself when they match, else
        wrapped so that each batch is brought to its own preprocessing (said in one line)."""
        if self.preprocessing.same_inputs(given):
            return self.module
        if self.preprocessing.channels != given.channels:
            raise UserError(
                f"{key}: '{self.source}' takes {self.preprocessing.channels}-channel images and this run's data gives "
                f"{given.channels}; set data.channels={self.preprocessing.channels}"
            )
        say(
            f"{key}: '{self.source}' was trained on {self.preprocessing.describe()}; this run's batches "
            f"({given.describe()}) are brought to it"
        )
        return InputAdapter(self.module, given, self.preprocessing)


def open_trained(spec: str | Path, key: str = "model.weights") -> TrainedModel:
    """The trained model `spec` names: a run directory (optionally `@best`, `@last`, `@ema`, `@swa`), a checkpoint
    file, or an ensemble run directory (its members fused by its saved rule). `key` is the config key that named
    it, for error messages."""
    path, weights = resolve(spec, key)
    ensemble = rundir.ensemble_dir(path)
    if ensemble is not None and not rundir.best_checkpoint(ensemble).is_file():
        return _open_ensemble(ensemble, key)
    checkpoint = read_checkpoint(path, key)
    config, classes = checkpoint["config"], checkpoint["classes"]
    preprocessing = Preprocessing.of_checkpoint(checkpoint)
    model = build_model(OmegaConf.create({**config["model"], "weights": None}), len(classes), preprocessing.channels)
    model = rebuild_architecture(model, checkpoint)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"{key}: '{path}' does not fit the model its config builds ({reason})") from None
    temperature = checkpoint.get("temperature")
    module = with_temperature(model.eval(), temperature)
    trained = TrainedModel(
        module, [str(c) for c in classes], preprocessing, path, weights, "model", config, checkpoint, temperature
    )
    trained.thresholds = checkpoint.get("thresholds") or _untuned(config, len(classes))
    return trained


def split_weights(spec: str | Path) -> tuple[str, str]:
    """`RUN@ema` -> ("RUN", "ema"); a spec without one of the WEIGHTS suffixes -> (spec, "")."""
    base, _, suffix = str(spec).rpartition("@")
    return (base, suffix) if base and suffix in WEIGHTS else (str(spec), "")


def resolve(spec: str | Path, key: str) -> tuple[Path, str]:
    """The checkpoint file (or ensemble directory) `spec` names and which weights: a run directory's best.pt
    (else last.pt), or its `@<weights>` file."""
    base, suffix = split_weights(spec)
    path = user_path(base)
    if not path.exists():
        raise UserError(f"{key}: '{path}' does not exist; give a shelltrain run directory or checkpoint file")
    if not path.is_dir() or rundir.ensemble_dir(path) is not None and not suffix:  # a file (or a device: refused)
        if suffix:
            raise UserError(f"{key}: '@{suffix}' selects a run directory's weights; give the run directory, not a file")
        return path, "best" if path.name != rundir.LAST else "last"
    return _run_weights(path, suffix, key)


def _run_weights(run: Path, weights: str, key: str) -> tuple[Path, str]:
    if weights:
        path = rundir.weights_checkpoint(run, weights)
        if not path.is_file():
            how = {"ema": "trainer.ema.decay", "swa": "trainer.swa.start_epoch"}.get(weights)
            hint = f"it was trained without {how}" if how else "the run did not finish an epoch"
            raise UserError(f"{key}: '{run}' has no {weights} weights ({path.name}): {hint}; use {run}@best")
        return path, weights
    for choice, path in (
        ("best", rundir.best_checkpoint(run)),
        ("last", rundir.last_checkpoint(run)),
        ("best", run / rundir.BEST),  # a folder of checkpoints
        ("last", run / rundir.LAST),
    ):
        if path.is_file():
            return path, choice
    best = rundir.best_checkpoint(Path()).as_posix()
    raise UserError(f"{key}: '{run}' has no {best} or {rundir.LAST}; give a run directory or a .pt file")


def read_checkpoint(path: Path, key: str) -> dict[str, Any]:
    """A shelltrain checkpoint's payload, checked to be one (config with a model section, classes)."""
    with quiet():  # an int8 checkpoint's tensors warn when loaded
        checkpoint = load_checkpoint(path)
    config, classes = checkpoint.get("config"), checkpoint.get("classes")
    if not isinstance(config, dict) or "model" not in config or not isinstance(classes, list):
        raise UserError(f"{key}: '{path}' has no model config and classes; it was not written by a shelltrain run")
    return checkpoint


def rebuild_architecture(
    model: nn.Module, checkpoint: dict[str, Any], example_inputs: torch.Tensor | None = None
) -> nn.Module:
    """`model` (freshly built from the config) turned into the architecture the checkpoint records: its pruning
    history replayed (removed blocks and channels, int8 conversion) on `example_inputs` (default: zeros)."""
    return prune.rebuild(model, checkpoint, example_inputs) if "pruning" in checkpoint else model


def read_ensemble(directory: Path) -> dict[str, Any]:
    """An ensemble run's ensemble.json (rule, weights, members' checkpoints), checked; the one reader of it."""
    path = directory / rundir.ENSEMBLE_REPORT
    try:
        report = rundir.read_json(path)
        valid = report["rule"] in ENSEMBLE_RULES[1:] and all("checkpoint" in m for m in report["members"])
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise UserError(f"'{path}' is not an ensemble description written by shelltrain (rule, members' checkpoints)")
    return report


def ensemble_members(directory: Path) -> list[Path]:
    """The checkpoint files of an ensemble run's members, in order."""
    return [directory / member["checkpoint"] for member in read_ensemble(directory)["members"]]


def _open_ensemble(directory: Path, key: str) -> TrainedModel:
    """An ensemble run as one model: its members fused by the rule and weights saved in ensemble.json. The members
    must share classes and preprocessing (one input feeds them all)."""
    report = read_ensemble(directory)
    members = [open_trained(path, key) for path in ensemble_members(directory)]
    first = members[0]
    for member in members[1:]:
        member.check_classes(first.classes, key, "the members of an ensemble must share one class set")
        if not member.preprocessing.same_inputs(first.preprocessing):
            raise UserError(
                f"{key}: the members of the ensemble '{directory}' differ in their preprocessing "
                f"({first.preprocessing.describe()} vs {member.preprocessing.describe()}); use one member's run instead"
            )
    multi = first.thresholds is not None
    fused = FusedModel([m.module for m in members], report["rule"], report["weights"], multi).eval()
    source = directory / rundir.ENSEMBLE_REPORT
    trained = TrainedModel(
        fused, first.classes, first.preprocessing, source, "best", "ensemble", first.config, members=members
    )
    if multi:  # multi-label: the ensemble's own, tuned on val, else the members' mean
        tuned = report.get("thresholds")
        trained.thresholds = tuned or torch.tensor([m.thresholds for m in members]).mean(0).tolist()
    return trained


def _untuned(config: dict[str, Any], count: int) -> list[float] | None:
    """A multi-label checkpoint without tuned thresholds (ema.pt, swa.pt, a run stopped before its test): 1/2 for
    every class; None for a single-label model."""
    return [DEFAULT_THRESHOLD] * count if is_multi_label(config["trainer"]["loss"]) else None


def sweep_jobs(
    sweep: str | Path, top_k: int | None, monitor: str, key: str = "ensemble.sweep"
) -> list[tuple[Path, float]]:
    """The best `top_k` finished jobs of a multirun directory by their summary.json's best `monitor`."""
    root = Path(sweep).expanduser()
    if not root.is_dir():
        raise UserError(f"{key}='{sweep}' is not a directory; give a multirun directory, e.g. multirun/DATE/TIME")
    metric = f"best_{monitor}"
    jobs = []
    for path in sorted(root.glob(f"*/{rundir.SUMMARY}"), key=lambda p: _natural(p.parent.name)):
        try:
            summary = rundir.read_json(path)
        except ValueError:  # a job killed while writing it: not finished
            continue
        value = summary.get(metric)
        if summary.get("status") == "completed" and isinstance(value, (int, float)) and not math.isnan(value):
            jobs.append((path.parent, float(value)))
    if not jobs:
        raise UserError(
            f"{key}='{sweep}' holds no finished jobs (<job>/summary.json with status completed and {metric})"
        )
    top_key = f"{key.rsplit('.', 1)[0]}.top_k"
    if top_k and len(jobs) < top_k:  # never fuse fewer members than asked for without saying so
        raise UserError(
            f"{top_key}={top_k} but {key}='{sweep}' holds only {len(jobs)} finished job(s); "
            f"lower {top_key} to {len(jobs)} or finish the sweep's other jobs first"
        )
    jobs.sort(key=lambda job: job[1], reverse=monitor_mode(monitor) == "max")  # stable: ties keep job order
    return jobs[:top_k] if top_k else jobs


def _brief(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _natural(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)
