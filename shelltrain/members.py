"""Where an ensemble's members come from: trained here (seeds or override sets, each a config of its own),
checkpoints and run directories, a saved ensemble run, or the best jobs of a sweep. Every member is checked
(its classes, its config) before any trains."""

from __future__ import annotations

import copy
import logging
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from shelltrain import rundir
from shelltrain.data import DataBundle
from shelltrain.engine import monitor_mode
from shelltrain.errors import UserError
from shelltrain.schema import validate
from shelltrain.schema_values import ENSEMBLE_RULES
from shelltrain.trained import load_trained_model

log = logging.getLogger("shelltrain")


# Training state a fused member does not need: its saved copy keeps the weights and what rebuilds them.
_TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng", "train_state")


@dataclass
class Member:
    origin: dict[str, Any]  # how it got here: kind trained | checkpoint | sweep | ensemble, and from where
    cfg: DictConfig | None = None  # trained (or fine-tuned) in this run: the config of its sub-run
    source: Path | None = None  # loaded: its checkpoint file
    model: nn.Module | None = None
    payload: dict[str, Any] | None = None  # the checkpoint it was loaded from
    epochs: int = 0
    params: int = 0
    saved: str = ""  # its checkpoint, relative to the run directory
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        config = self.cfg.model if self.cfg is not None else (self.payload or {}).get("config", {}).get("model", {})
        return _model_name(config)


def gather_members(cfg: DictConfig, data: DataBundle) -> tuple[list[Member], dict[str, Any] | None]:
    """Every member, checked before any trains: those trained here, then the loaded ones (the ensemble
    in model.weights, ensemble.checkpoints, sweep jobs). Returns them and that ensemble's description."""
    entries: list[tuple[str | Path, str, dict[str, Any]]] = []
    reused_dir = rundir.ensemble_dir(cfg.model.get("weights"))
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
    for entry, key, origin in entries:
        for path, full_origin in _expand(entry, key, origin):
            model, payload, path = load_trained_model(str(path), key)
            if [str(c) for c in payload["classes"]] != [str(c) for c in data.classes]:
                raise UserError(
                    f"{key}: '{path}' was trained on the classes {_brief(payload['classes'])}, but this run's data "
                    f"has {_brief(data.classes)}; ensemble members must share one class set"
                )
            _warn_on_data_mismatch(cfg, path, payload)
            members.append(Member(origin=full_origin, source=path, model=model, payload=payload))
    return members, reused


def read_ensemble(directory: Path) -> dict[str, Any]:
    path = directory / rundir.ENSEMBLE_REPORT
    try:
        report = rundir.read_json(path)
        valid = report["rule"] in ENSEMBLE_RULES[1:] and all("checkpoint" in m for m in report["members"])
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise UserError(f"'{path}' is not an ensemble description written by shelltrain (rule, members' checkpoints)")
    return report


def sweep_jobs(sweep: str | Path, top_k: int | None, monitor: str) -> list[tuple[Path, float]]:
    """The best `top_k` finished jobs of a multirun directory by their summary.json's best `monitor`."""
    root = Path(sweep).expanduser()
    if not root.is_dir():
        raise UserError(
            f"ensemble.sweep='{sweep}' is not a directory; give a multirun directory, e.g. multirun/DATE/TIME"
        )
    key = f"best_{monitor}"
    jobs = []
    for path in sorted(root.glob(f"*/{rundir.SUMMARY}"), key=lambda p: _natural(p.parent.name)):
        try:
            summary = rundir.read_json(path)
        except ValueError:  # a job killed while writing it: not finished
            continue
        value = summary.get(key)
        if summary.get("status") == "completed" and isinstance(value, (int, float)) and not math.isnan(value):
            jobs.append((path.parent, float(value)))
    if not jobs:
        raise UserError(
            f"ensemble.sweep='{sweep}' holds no finished jobs (<job>/summary.json with status completed and {key})"
        )
    if top_k and len(jobs) < top_k:  # never fuse fewer members than asked for without saying so
        raise UserError(
            f"ensemble.top_k={top_k} but ensemble.sweep='{sweep}' holds only {len(jobs)} finished job(s); "
            f"lower ensemble.top_k to {len(jobs)} or finish the sweep's other jobs first"
        )
    jobs.sort(key=lambda job: job[1], reverse=monitor_mode(monitor) == "max")  # stable: ties keep job order
    return jobs[:top_k] if top_k else jobs


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


def _expand(entry: str | Path, key: str, origin: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """An ensemble run directory is its members; a run directory or file is one member."""
    directory = rundir.ensemble_dir(entry)
    if directory is None:
        path = Path(entry).expanduser().absolute()
        if not path.exists():
            raise UserError(f"{key}: '{entry}' does not exist; give run directories, checkpoint files or ensemble runs")
        if path.is_dir() and not (path / rundir.CHECKPOINTS).is_dir() and any(path.glob(f"*/{rundir.SUMMARY}")):
            raise UserError(f"{key}: '{entry}' holds the jobs of a sweep; use ensemble.sweep={entry} (ensemble.top_k)")
        return [(path, {**origin, "source": str(path)})]
    directory = directory.absolute()
    members = read_ensemble(directory)["members"]
    return [
        (
            directory / m["checkpoint"],
            {**origin, "kind": "ensemble", "source": str(directory), "member": i, "was": m.get("origin")},
        )
        for i, m in enumerate(members)
    ]


def finetune_config(cfg: DictConfig, member: Member, index: int) -> DictConfig:
    """A loaded member trained further (trainer.epochs > 0, or pruned): a sub-run with this run's settings and
    the member's own model options, starting from its checkpoint (model.weights)."""
    member_cfg = _single(cfg)
    model = dict(member.payload["config"]["model"])  # type: ignore[index]
    model["weights"] = str(member.source)  # a pruned checkpoint keeps its architecture (transfer's rebuild)
    member_cfg.model = OmegaConf.create(model)
    member_cfg.trainer.seed = cfg.trainer.seed + index
    return member_cfg


def portable(member: Member) -> dict[str, Any]:
    """What a loaded member's saved copy holds: its weights and whatever rebuilds it, no optimizer state."""
    assert member.payload is not None
    return {**{k: v for k, v in member.payload.items() if k not in _TRAINING_ONLY}, "origin": member.origin}


def _warn_on_data_mismatch(cfg: DictConfig, path: Path, payload: dict[str, Any]) -> None:
    """Members trained on other inputs or other splits still load; say what differs."""
    theirs = payload.get("config", {}).get("data", {})
    ours = OmegaConf.to_container(cfg.data, resolve=True)
    keys = ("name", "image_size", "channels", "mean", "std", "split_seed", "val_fraction", "test_fraction")
    differ = [
        f"data.{k}={theirs[k]!r} (this run: {ours.get(k)!r})" for k in keys if k in theirs and theirs[k] != ours.get(k)
    ]
    if differ:
        log.warning("member '%s' was trained with %s", path, ", ".join(differ))


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


def _model_name(model_cfg: Any) -> str:
    return str(model_cfg.get("name") or model_cfg.get("_target_") or "model")


def _brief(classes: Sequence[str]) -> str:
    shown = ", ".join(map(str, list(classes)[:5]))
    return f"[{shown}{', ...' if len(classes) > 5 else ''}] ({len(classes)} classes)"


def _natural(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)
