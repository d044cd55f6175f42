"""Ensembling: several classifiers fused into one prediction.

The combination rules are plain functions on member probabilities, M members x N samples x C
classes: `average`, `weighted` (with `accuracy_weights`) and `vote`. `run_ensemble` is the stage:
it gathers the members (trained in this run, loaded from checkpoints or ensemble run directories, or
the best jobs of a sweep). A member that trains is a complete sub-run in `members/<i>`, run by the
function the runner hands over (the whole pipeline: fine-tuning, pruning, loggers, plots, summary);
every member is then loaded from its checkpoint by `trained.load_trained_model`, evaluated and fused.
The run directory keeps `ensemble.json` and `members/<i>/checkpoints/best.pt`, so it is itself a
reusable ensemble (`model.weights=<dir>` or an `ensemble.checkpoints` entry).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from shelltrain.checkpoint import save_checkpoint
from shelltrain.data import DataBundle
from shelltrain.engine import TrainSettings, metrics_from_logits, monitor_mode, predict
from shelltrain.errors import UserError
from shelltrain.metrics import confusion_matrix
from shelltrain.models import count_parameters
from shelltrain.prune import eval_settings
from shelltrain.quantize import is_quantized, quiet
from shelltrain.report import say
from shelltrain.resume import Resume
from shelltrain.rundir import ENSEMBLE_REPORT, MEMBERS, best_checkpoint, ensemble_dir, last_checkpoint, write_json
from shelltrain.schema import ENSEMBLE_RULES, validate
from shelltrain.trained import load_trained_model

log = logging.getLogger("shelltrain")

# Training state a fused member does not need: its saved copy keeps the weights and what rebuilds them.
_TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng", "train_state")

# train_member(member_cfg, out_dir, label, resume): the whole pipeline for one model, a sub-run in out_dir
TrainMember = Callable[[DictConfig, Path, str, Resume | None], Any]


# ---- combination rules --------------------------------------------------------------------------


def average(probs: torch.Tensor) -> torch.Tensor:
    """The mean of M x N x C member probabilities: N x C."""
    return probs.mean(0)


def weighted(probs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """The weighted mean of M x N x C member probabilities (weights normalized to sum 1): N x C."""
    w = torch.as_tensor(list(weights), dtype=probs.dtype, device=probs.device)
    return torch.einsum("m,mnc->nc", w / w.sum(), probs)


def accuracy_weights(val_accs: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Weights proportional to val_acc ** (1 / temperature), summing to 1.

    temperature 1 normalizes the accuracies; below 1 sharpens towards the best member, above 1
    flattens towards uniform. All accuracies 0 (or NaN) gives uniform weights.
    """
    acc = torch.nan_to_num(torch.tensor(list(val_accs), dtype=torch.float64), nan=0.0).clamp_min(0)
    if not bool((acc > 0).any()):
        return [1.0 / len(acc)] * len(acc)
    return torch.softmax(acc.log() / temperature, 0).tolist()  # log space: no underflow at small temperatures


def vote(probs: torch.Tensor) -> torch.Tensor:
    """Majority vote of the members' predicted classes (N); a tie goes to the tied class with the
    highest probability summed over the members."""
    votes = F.one_hot(probs.argmax(2), probs.shape[2]).sum(0)  # N x C
    tied = votes == votes.amax(1, keepdim=True)
    return probs.sum(0).masked_fill(~tied, float("-inf")).argmax(1)


def fuse(rule: str, probs: torch.Tensor, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's N x C probabilities and N predicted classes. A vote's predictions come from the
    votes; its probabilities (used for its loss) are the members' mean."""
    if rule == "vote":
        return average(probs), vote(probs)
    fused = weighted(probs, weights) if rule == "weighted" else average(probs)
    return fused, fused.argmax(1)


def fused_metrics(probs: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy of the predictions and the negative log-likelihood of the fused probabilities."""
    if targets.numel() == 0:
        return {"loss": math.nan, "acc": math.nan}
    return {
        "loss": F.nll_loss(probs.clamp_min(1e-12).log(), targets).item(),
        "acc": (preds == targets).float().mean().item(),
    }


# ---- evaluating members -------------------------------------------------------------------------


def same_architecture(models: Sequence[nn.Module]) -> bool:
    """Same module type and the same state-dict names, shapes and dtypes: stackable for vmap."""

    def signature(model: nn.Module) -> tuple:
        return type(model), [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]

    first = signature(models[0])
    return all(signature(m) == first for m in models[1:])


class StackedMembers(nn.Module):
    """Same-architecture members as one module: their weights stacked with
    `torch.func.stack_module_state`, one `vmap`ped `functional_call` per batch; forward gives N x M x C."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        from torch.func import stack_module_state

        params, buffers = stack_module_state([m.eval() for m in models])
        self.param_names, self.buffer_names = list(params), list(buffers)
        for i, tensor in enumerate([*params.values(), *buffers.values()]):
            self.register_buffer(f"stacked_{i}", tensor.detach().contiguous())
        # In a list: not a submodule, so .to() and state_dict() leave the weightless template alone.
        self.template = [copy.deepcopy(models[0]).eval().to("meta")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        tensors = [getattr(self, f"stacked_{i}") for i in range(len(self.param_names) + len(self.buffer_names))]
        params = dict(zip(self.param_names, tensors))
        buffers = dict(zip(self.buffer_names, tensors[len(self.param_names) :]))

        def call(p: dict, b: dict) -> torch.Tensor:
            return functional_call(self.template[0], (p, b), (x,))

        x = x.contiguous()  # channels_last (here or in the weights) sends adaptive pooling to a slow vmap fallback

        return vmap(call)(params, buffers).transpose(0, 1)


def member_logits(
    models: Sequence[nn.Module], loader: Any, settings: TrainSettings, limit: int | None, stacked: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """M x N x C logits of every member over a loader and the N targets: one model after another (an int8
    member on the CPU), or (`stacked`, same architecture only) all at once with vmap."""
    if stacked:  # contiguous: channels_last does not apply to stacked 5-d weights, and slows vmap's pooling
        members = StackedMembers([m.to(settings.device) for m in models])
        logits, targets = predict(members, loader, replace(settings, channels_last=False), limit)
        return logits.transpose(0, 1).contiguous(), targets
    outputs = [predict(m, loader, eval_settings(m, settings), limit) for m in models]
    return torch.stack([logits for logits, _ in outputs]), outputs[0][1]


# ---- where members come from -------------------------------------------------------------------


def read_ensemble(directory: Path) -> dict[str, Any]:
    path = directory / ENSEMBLE_REPORT
    try:
        report = json.loads(path.read_text())
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
    for path in sorted(root.glob("*/summary.json"), key=lambda p: _natural(p.parent.name)):
        try:
            summary = json.loads(path.read_text())
        except ValueError:  # a job killed while writing it: not finished
            continue
        value = summary.get(key)
        if summary.get("status") == "completed" and isinstance(value, (int, float)) and not math.isnan(value):
            jobs.append((path.parent, float(value)))
    if not jobs:
        raise UserError(
            f"ensemble.sweep='{sweep}' holds no finished jobs (<job>/summary.json with status completed and {key})"
        )
    jobs.sort(key=lambda job: job[1], reverse=monitor_mode(monitor) == "max")  # stable: ties keep job order
    return jobs[:top_k] if top_k else jobs


# ---- the stage ----------------------------------------------------------------------------------


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


@dataclass
class EnsembleResult:
    report: dict[str, Any]  # what ensemble.json holds
    val: dict[str, float]
    test: dict[str, float]
    members: list[Member]
    confusion: torch.Tensor  # of the ensemble's test predictions

    def figures(self) -> dict[str, Any]:
        """summary.json's headline keys for the ensemble, and its section."""
        return {
            "best_val_acc": self.val["acc"],
            "best_val_loss": self.val["loss"],
            "best_epoch": None,
            "epochs_completed": max(m.epochs for m in self.members),
            "stopped_early": False,
            "params": sum(m.params for m in self.members),
            "ensemble": {k: v for k, v in self.report.items() if k != "classes"},
        }


def run_ensemble(
    cfg: DictConfig,
    data: DataBundle,
    settings: TrainSettings,
    train_member: TrainMember,
    run_dir: Path,
    console: Console,
    resume: bool = False,
) -> EnsembleResult:
    """Gather the members (every one checked before any trains), train or fine-tune those that need it one
    after another as sub-runs in members/<i>, evaluate them all, fuse them and write ensemble.json.

    `resume` continues an interrupted ensemble in run_dir: every member sub-run with a checkpoint resumes in
    place (one that finished returns at once), the others train."""
    rule, weights = cfg.ensemble.name, cfg.ensemble.weights
    members, reused = gather_members(cfg, data)
    if not members:
        raise UserError(
            f"ensemble={rule} has no members: model.weights='{cfg.model.get('weights')}' is not an ensemble run "
            "directory; set ensemble.members, ensemble.checkpoints or ensemble.sweep"
        )
    if reused is not None and rule == "none":  # model.weights=<ensemble dir>: that ensemble as it was saved
        rule = reused["rule"]
        weights = reused.get("weights") if rule == "weighted" else None
    if weights is not None and len(weights) != len(members):
        raise UserError(
            f"ensemble.weights has {len(weights)} entries for {len(members)} members; give one weight per member"
        )
    say(console, f"ensemble: {rule} of {len(members)} members")

    trains_loaded = settings.epochs > 0 or cfg.prune.name != "none"  # loaded members go through the pipeline too
    for i, member in enumerate(members):
        out_dir = run_dir / MEMBERS / str(i)
        label = f"member {i + 1}/{len(members)}"
        if member.cfg is None and trains_loaded:
            member.cfg = _finetune_config(cfg, member, i)
        if member.cfg is not None:
            last = last_checkpoint(out_dir)
            continued = Resume(last, in_place=True) if resume and last.is_file() else None
            doing = "continuing" if continued else "training"
            say(console, f"[bold]ensemble {label}[/bold]: {doing} {member.model_name} ({_describe(member.origin)})")
            out_dir.mkdir(parents=True, exist_ok=True)
            train_member(member.cfg, out_dir, label, continued)
            member.model, member.payload, _ = load_trained_model(str(out_dir), f"ensemble {label}")
            member.epochs = int(json.loads((out_dir / "summary.json").read_text())["epochs_completed"])
        else:
            say(console, f"ensemble {label}: {member.model_name} from {_describe(member.origin)}")
            with quiet():  # quantized tensors warn when serialized
                save_checkpoint(_portable(member), best_checkpoint(out_dir))  # a copy: the run dir is self-contained
        member.saved = best_checkpoint(Path(MEMBERS) / str(i)).as_posix()
        member.params = count_parameters(member.model)

    models = [m.model for m in members]
    stacked = _use_vmap(cfg.ensemble.vmap, models, settings)
    val_logits, val_targets = member_logits(models, data.val, settings, settings.limit_val_batches, stacked)
    test_logits, test_targets = member_logits(models, data.test, settings, cfg.trainer.limit_test_batches, stacked)
    for member, val, test in zip(members, val_logits, test_logits):
        member.val = metrics_from_logits(val, val_targets, settings)
        member.test = metrics_from_logits(test, test_targets, settings)

    if rule == "weighted" and weights is None:
        weights = accuracy_weights([m.val["acc"] for m in members], cfg.ensemble.temperature)
    elif rule == "weighted":
        weights = [w / sum(weights) for w in weights]
    else:
        weights = [1.0 / len(members)] * len(members)  # average: equal shares; vote: one vote each
    val = fused_metrics(*fuse(rule, val_logits.softmax(2), weights), val_targets)
    test_probs, test_preds = fuse(rule, test_logits.softmax(2), weights)
    test = fused_metrics(test_probs, test_preds, test_targets)
    confusion = confusion_matrix(F.one_hot(test_preds, data.num_classes), test_targets, data.num_classes)

    report = _report(rule, weights, cfg, members, val, test, stacked, data.classes)
    write_json(report, run_dir / ENSEMBLE_REPORT)
    console.print(ensemble_table(report))
    return EnsembleResult(report, val, test, members, confusion)


def gather_members(cfg: DictConfig, data: DataBundle) -> tuple[list[Member], dict[str, Any] | None]:
    """Every member, checked before any trains: those trained here, then the loaded ones (the ensemble
    in model.weights, ensemble.checkpoints, sweep jobs). Returns them and that ensemble's description."""
    entries: list[tuple[str | Path, str, dict[str, Any]]] = []
    reused_dir = ensemble_dir(cfg.model.get("weights"))
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
    directory = ensemble_dir(entry)
    if directory is None:
        path = Path(entry).expanduser().absolute()
        if not path.exists():
            raise UserError(f"{key}: '{entry}' does not exist; give run directories, checkpoint files or ensemble runs")
        if path.is_dir() and not (path / "checkpoints").is_dir() and any(path.glob("*/summary.json")):
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


def _finetune_config(cfg: DictConfig, member: Member, index: int) -> DictConfig:
    """A loaded member trained further (trainer.epochs > 0, or pruned): a sub-run with this run's settings and
    the member's own model options, starting from its checkpoint (model.weights)."""
    member_cfg = _single(cfg)
    model = dict(member.payload["config"]["model"])  # type: ignore[index]
    model["weights"] = str(member.source)  # a pruned checkpoint keeps its architecture (transfer's rebuild)
    member_cfg.model = OmegaConf.create(model)
    member_cfg.trainer.seed = cfg.trainer.seed + index
    return member_cfg


def _portable(member: Member) -> dict[str, Any]:
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


def _use_vmap(option: Any, models: list[nn.Module], settings: TrainSettings) -> bool:
    if option is False or len(models) < 2 or any(map(is_quantized, models)) or not same_architecture(models):
        return False
    return option is True or settings.device.type == "cuda"  # auto: on a CPU a plain loop is faster


def _report(
    rule: str,
    weights: list[float],
    cfg: DictConfig,
    members: list[Member],
    val: dict[str, float],
    test: dict[str, float],
    stacked: bool,
    classes: list[str],
) -> dict[str, Any]:
    report: dict[str, Any] = {"rule": rule, "weights": weights}
    if rule == "weighted" and cfg.ensemble.weights is None:
        report["temperature"] = cfg.ensemble.temperature
    report["members"] = [
        {
            "index": i,
            "origin": m.origin,
            "checkpoint": m.saved,
            "model": m.model_name,
            "params": m.params,
            "epochs_trained": m.epochs,
            "weight": w,
            "val_acc": m.val["acc"],
            "val_loss": m.val["loss"],
            "test_acc": m.test["acc"],
            "test_loss": m.test["loss"],
        }
        for i, (m, w) in enumerate(zip(members, weights))
    ]
    member_test = [m.test["acc"] for m in members]
    report.update(
        val_acc=val["acc"],
        val_loss=val["loss"],
        test_acc=test["acc"],
        test_loss=test["loss"],
        members_mean_test_acc=sum(member_test) / len(member_test),
        members_best_test_acc=max(member_test),
        evaluation="vmap" if stacked else "loop",
        classes=list(classes),
    )
    return report


def ensemble_table(report: dict[str, Any]) -> Table:
    """The members against the ensemble: origin, size, weight, validation and test accuracy."""
    table = Table(title=f"ensemble ({report['rule']}) vs its members", show_header=True)
    for column, justify in [
        ("member", "left"),
        ("model", "left"),
        ("origin", "left"),
        ("params", "right"),
        ("weight", "right"),
        ("val_acc", "right"),
        ("test_acc", "right"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for m in report["members"]:
        table.add_row(
            str(m["index"]),
            m["model"],
            _describe(m["origin"], short=True),
            f"{m['params']:,}",
            f"{m['weight']:.3f}",
            _acc(m["val_acc"]),
            _acc(m["test_acc"]),
        )
    table.add_section()
    table.add_row(
        "[bold]ensemble[/bold]",
        report["rule"],
        f"{len(report['members'])} members",
        f"{sum(m['params'] for m in report['members']):,}",
        "1.000",
        f"[bold]{_acc(report['val_acc'])}[/bold]",
        f"[bold]{_acc(report['test_acc'])}[/bold]",
    )
    return table


def _describe(origin: dict[str, Any], short: bool = False) -> str:
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


def _acc(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4f}"


def _natural(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)
