"""Where an ensemble's members come from: trained here (seeds or override sets, each a config of its own),
checkpoints and run directories, a saved ensemble run, or the best jobs of a sweep. Every member is checked
(its classes, its config) before any trains."""

from __future__ import annotations

import copy
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from shelltrain import rundir
from shelltrain.data import DataBundle
from shelltrain.errors import UserError
from shelltrain.preprocess import Preprocessing
from shelltrain.schema import validate
from shelltrain.trained import TrainedModel, ensemble_members, open_trained, read_ensemble, split_weights, sweep_jobs

# Training state a fused member does not need: its saved copy keeps the weights and what rebuilds them.
_TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng", "train_state")


@dataclass
class Member:
    origin: dict[str, Any]  # how it got here: kind trained | checkpoint | sweep | ensemble, and from where
    cfg: DictConfig | None = None  # trained (or fine-tuned) in this run: the config of its sub-run
    trained: TrainedModel | None = None  # once trained or loaded
    model: nn.Module | None = None  # what the ensemble evaluates: the trained module fed this run's batches
    epochs: int = 0
    params: int = 0
    saved: str = ""  # its checkpoint, relative to the run directory
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        if self.cfg is not None:
            return str(self.cfg.model.get("name") or self.cfg.model.get("_target_") or "model")
        return self.trained.name if self.trained is not None else "model"


def gather_members(cfg: DictConfig, data: DataBundle, say: Callable[[str], None]) -> tuple[list[Member], dict | None]:
    """Every member, checked before any trains: those trained here, then the loaded ones (the ensemble
    in model.weights, ensemble.checkpoints, sweep jobs), each fed this run's batches in its own preprocessing.
    Returns them and that ensemble's description."""
    entries: list[tuple[str | Path, str, dict[str, Any]]] = []
    reused_dir = rundir.ensemble_dir(cfg.model.weights)
    reused = read_ensemble(reused_dir) if reused_dir is not None else None
    if reused_dir is not None:
        entries.append((reused_dir, "model.weights", {"kind": "ensemble"}))
    members = _trained_members(cfg, reused_dir is not None)
    checkpoints = cfg.ensemble.checkpoints
    checkpoints = checkpoints if OmegaConf.is_list(checkpoints) else [checkpoints]  # one path, or a list
    entries += [(str(entry), "ensemble.checkpoints", {"kind": "checkpoint"}) for entry in checkpoints]
    if cfg.ensemble.sweep:
        jobs = sweep_jobs(cfg.ensemble.sweep, cfg.ensemble.top_k, cfg.trainer.monitor)
        entries += [(job, "ensemble.sweep", {"kind": "sweep", f"best_{cfg.trainer.monitor}": v}) for job, v in jobs]
    given = Preprocessing.of_data(data)
    for entry, key, origin in entries:
        for path, full_origin in _expand(entry, key, origin):
            trained = open_trained(path, key)
            trained.check_classes(data.classes, key, "ensemble members must share one class set")
            _say_split_mismatch(cfg, trained, say)
            members.append(Member(origin=full_origin, trained=trained, model=trained.fed(given, key, say)))
    return members, reused


def _trained_members(cfg: DictConfig, weights_are_an_ensemble: bool) -> list[Member]:
    spec = cfg.ensemble.members
    if not spec:
        return []
    override_sets = [[] for _ in range(spec)] if isinstance(spec, int) else [_override_set(s) for s in spec]
    members = []
    for i, overrides in enumerate(override_sets):
        member_cfg = _member_config(cfg, cfg.trainer.seed + i, overrides, i)
        if weights_are_an_ensemble:  # that ensemble is a source of members, not this member's start
            member_cfg.model.weights = None
        origin: dict[str, Any] = {"kind": "trained", "seed": member_cfg.trainer.seed}
        if overrides:
            origin["overrides"] = overrides
        members.append(Member(origin=origin, cfg=member_cfg))
    return members


def _member_config(cfg: DictConfig, seed: int, overrides: list[str], index: int) -> DictConfig:
    """This run's config for one model, with seed `seed` and the member's overrides: a plain copy without
    overrides, else composed again by Hydra (group choices like model=resnet18 need composition)."""
    if not overrides:
        member_cfg = _single(cfg)
        member_cfg.trainer.seed = seed
        return member_cfg
    where = f"ensemble.members[{index}] ({' '.join(overrides)})"
    try:
        member_cfg = _single(_compose([*_run_overrides(overrides), f"trainer.seed={seed}", *overrides]))
    except Exception as exc:  # Hydra's composition errors: a bad group option or key in the member's set
        raise UserError(f"{where}: {str(exc).strip().splitlines()[0]}") from None
    try:
        validate(member_cfg)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    for group in ("data", "augmentation"):
        if OmegaConf.to_container(member_cfg[group], resolve=True) != OmegaConf.to_container(cfg[group], resolve=True):
            raise UserError(
                f"{where} changes {group}; members share this run's data and augmentation, "
                f"so set {group} for the whole run"
            )
    return member_cfg


def _single(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` for one model: the ensemble options off, so a member is a plain run."""
    single = copy.deepcopy(cfg)
    single.trainer.resume = None  # an ensemble resumes member by member (run_ensemble)
    single.ensemble.merge_with(
        {"name": "none", "members": None, "checkpoints": [], "sweep": None, "top_k": None, "weights": None}
    )
    return single


def _run_overrides(member_overrides: list[str]) -> list[str]:
    """The run's command-line overrides, less those of groups the member chooses for itself:
    with model=mobilenet_v3_small, the run's model=cnn and model.width=8 do not apply."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    groups = {_override_key(o) for o in member_overrides if "." not in _override_key(o)}
    return [
        o
        for o in HydraConfig.get().overrides.task
        if _override_key(o) not in groups and _override_key(o).split(".")[0] not in groups
    ]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the CLI: its search path, --config-dir included
        return compose(config_name="train", overrides=overrides)
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _override_set(spec: Any) -> list[str]:
    """One member's overrides: "model=cnn model.width=8", ["model=cnn", ...] or {model: cnn, ...}."""
    if isinstance(spec, str):
        return shlex.split(spec)
    if isinstance(spec, dict) or OmegaConf.is_dict(spec):
        return [f"{key}={_override_value(value)}" for key, value in dict(spec).items()]
    return [str(item) for item in spec]


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def _expand(entry: str | Path, key: str, origin: dict[str, Any]) -> list[tuple[Path | str, dict[str, Any]]]:
    """An ensemble run directory is its members; a run directory or file is one member."""
    base, weights = split_weights(entry)  # RUN@ema: one of a run's weights
    directory = None if weights else rundir.ensemble_dir(entry)
    if directory is None:
        path = Path(base).expanduser().absolute()
        if not path.exists():
            raise UserError(f"{key}: '{entry}' does not exist; give run directories, checkpoint files or ensemble runs")
        if path.is_dir() and not (path / rundir.CHECKPOINTS).is_dir() and any(path.glob(f"*/{rundir.SUMMARY}")):
            raise UserError(f"{key}: '{entry}' holds the jobs of a sweep; use ensemble.sweep={entry} (ensemble.top_k)")
        chosen = f"{path}@{weights}" if weights else path
        return [(chosen, {**origin, "source": str(chosen)})]
    directory = directory.absolute()
    members = read_ensemble(directory)["members"]
    return [
        (path, {**origin, "kind": "ensemble", "source": str(directory), "member": i, "was": m.get("origin")})
        for i, (m, path) in enumerate(zip(members, ensemble_members(directory)))
    ]


def finetune_config(cfg: DictConfig, member: Member, index: int) -> DictConfig:
    """A loaded member trained further (trainer.epochs > 0, or pruned): a sub-run with this run's settings and
    the member's own model options, starting from its checkpoint (model.weights)."""
    member_cfg = _single(cfg)
    assert member.trained is not None
    model = dict(member.trained.config["model"])
    model["weights"] = str(member.trained.source)  # a pruned checkpoint keeps its architecture
    member_cfg.model = OmegaConf.create(model)
    member_cfg.trainer.seed = cfg.trainer.seed + index
    return member_cfg


def portable(member: Member) -> dict[str, Any]:
    """What a loaded member's saved copy holds: its weights and whatever rebuilds it, no optimizer state."""
    assert member.trained is not None
    kept = {k: v for k, v in member.trained.checkpoint.items() if k not in _TRAINING_ONLY}
    return {**kept, "origin": member.origin}


def _say_split_mismatch(cfg: DictConfig, trained: TrainedModel, say: Callable[[str], None]) -> None:
    """A member trained on another data set or other splits may have seen this run's test images: said, not
    hidden in the log (its preprocessing is taken care of by TrainedModel.fed)."""
    theirs = trained.config.get("data", {})
    ours = OmegaConf.to_container(cfg.data, resolve=True)
    keys = ("name", "split_seed", "val_fraction", "test_fraction")
    differ = [
        f"data.{k}={theirs[k]!r} (this run: {ours.get(k)!r})" for k in keys if theirs.get(k, ours.get(k)) != ours.get(k)
    ]
    if differ:
        say(f"note: member '{trained.source}' was trained with {', '.join(differ)}")


def describe_origin(origin: dict[str, Any], short: bool = False) -> str:
    """Where a member came from, in words; `short` (for the table) cuts paths to what tells them apart."""
    kind = origin.get("kind")
    if kind == "trained":
        extra = f", {' '.join(origin['overrides'])}" if origin.get("overrides") else ""
        return f"trained here, seed {origin['seed']}{extra}"
    source = _short_path(origin.get("source", "")) if short else origin.get("source")
    if kind == "sweep":
        metric = next((f" ({k} {v:.4f})" for k, v in origin.items() if k.startswith("best_")), "")
        return f"sweep job {source}{metric}"
    if kind == "ensemble":
        return f"ensemble {source} member {origin['member']}"
    return f"checkpoint {source}"


def _short_path(path: str) -> str:
    """Relative to the working directory when below it, else its last two parts."""
    full = Path(path)
    try:
        return str(full.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*full.parts[-2:])) if len(full.parts) > 2 else path
