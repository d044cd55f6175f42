"""Structured-config schemas and value checks, run before any data is loaded.

Types come from the dataclasses (OmegaConf converts "5" to 5 and rejects "abc" for an int);
ranges and cross-field rules are checked by hand so each failure names its key and the fix.
Groups that are just a `_target_` (optimizer, scheduler, a user's own model) are free-form:
only the keys shelltrain itself reads are checked.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from shelltrain.errors import UserError
from shelltrain.rundir import ensemble_dir


@dataclass
class TrainerSchema:
    epochs: int = 10
    device: str = "auto"
    precision: str = "32"
    channels_last: bool = False
    grad_clip: float = 0.0
    accumulate: int = 1
    seed: int = 0
    deterministic: bool = False
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    l1: float = 0.0
    monitor: str = "val_acc"
    patience: Optional[int] = None
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    limit_test_batches: Optional[int] = None
    overfit_batches: int = 0
    threads: Optional[int] = None
    resume: Optional[str] = None
    checkpoint_every_n_steps: int = 0
    keep_checkpoints: int = 0
    compile: bool = False
    sync_batchnorm: bool = False
    devices: int = 1


@dataclass
class DataSchema:
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = 32  # null: the input size of model.weights
    channels: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    drop_last: bool = False
    persistent_workers: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    limit_samples: Optional[int] = None
    num_samples: Optional[int] = None
    num_classes: Optional[int] = None
    classes: Optional[list[Any]] = None
    samples_per_class: Optional[int] = None
    on_device: bool = False
    source: Optional[Any] = None  # a _target_ returning (splits, classes): a user's dataset


@dataclass
class ModelSchema:
    name: str = "resnet18"
    small_input: bool = False
    dropout: float = 0.0
    width: Optional[int] = None
    weights: Optional[str] = None
    strict: bool = False


@dataclass
class FinetuneSchema:
    policy: str = "full"
    unfreeze_at: int = 0
    unfreeze_every: int = 1
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    freeze_bn: bool = True


@dataclass
class EvaluateSchema:
    split: str = "test"


@dataclass
class PredictSchema:
    input: Optional[str] = None
    batch_size: int = 64


@dataclass
class ExportSchema:
    format: str = "onnx"
    tolerance: float = 1e-4


@dataclass
class AugmentationSchema:
    name: str = "none"
    train: list[Any] = field(default_factory=list)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class CVSchema:
    folds: int = 0
    refit: bool = True


@dataclass
class EnsembleSchema:
    name: str = "none"
    members: Any = None
    checkpoints: Any = field(default_factory=list)  # a list, or one path
    sweep: Optional[str] = None
    top_k: Optional[int] = None
    weights: Optional[list[float]] = None
    temperature: float = 1.0
    vmap: Any = "auto"


PRECISIONS = ("32", "bf16", "16-mixed")
LOSSES = ("cross_entropy", "mse")
MONITORS = ("val_acc", "val_loss")
# Model families whose structured (channel) pruning torch-pruning 1.6 cannot do.
STRUCTURED_UNSUPPORTED = ("swin", "shufflenet")
POLICIES = ("full", "linear_probe", "freeze_backbone", "gradual")
DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "synthetic")
# data.name -> (its name in messages, what torchvision expects under data.root)
DATASET_FILES = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py/"),
    "cifar100": ("CIFAR-100", "cifar-100-python/"),
    "mnist": ("MNIST", "MNIST/raw/"),
    "fashion_mnist": ("Fashion-MNIST", "FashionMNIST/raw/"),
}
IMAGEFOLDER_LAYOUT = "train/<class>/<image> (val/ and test/ optional)"
TASKS = ("train", "evaluate", "predict", "export")
SPLITS = ("test", "val", "train")
EXPORT_FORMATS = ("onnx", "torchscript")
LOGGERS = ("csv", "tensorboard", "jsonl")

# prune.name -> the schedules it supports (the first is its default)
PRUNE_SCHEDULES = {
    "threshold": ("oneshot", "iterative", "hierarchical"),
    "magnitude": ("oneshot", "iterative", "hierarchical", "adaptive"),
    "random": ("oneshot", "iterative", "hierarchical", "adaptive"),
    "structured": ("oneshot", "iterative", "hierarchical", "adaptive"),
    "layer": ("oneshot", "iterative", "adaptive"),
    "quantize": ("oneshot",),
}
PRUNE_IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "fpgm", "random")
PRUNE_RAMPS = ("linear", "cubic")
QUANTIZE_MODES = ("auto", "static", "dynamic", "fake")
QUANTIZE_BACKENDS = ("x86", "fbgemm", "qnnpack")
ENSEMBLE_RULES = ("none", "average", "weighted", "vote")


def validate(cfg: DictConfig) -> None:
    """Raise UserError with one line for the first bad value in the composed config."""
    trainer = _typed(cfg.trainer, TrainerSchema, "trainer")
    if "_target_" not in cfg.model:
        _typed(cfg.model, ModelSchema, "model")
    augmentation = _typed(cfg.augmentation, AugmentationSchema, "augmentation")

    _at_least("trainer.epochs", trainer.epochs, 0)
    _one_of("trainer.precision", trainer.precision, PRECISIONS)
    _one_of("trainer.loss", trainer.loss, LOSSES)
    _one_of("trainer.monitor", trainer.monitor, MONITORS)
    if not (trainer.device in ("auto", "cpu", "cuda") or trainer.device.startswith("cuda:")):
        raise UserError(f"trainer.device={trainer.device!r} is invalid; use auto, cpu, cuda or cuda:N")
    _at_least("trainer.grad_clip", trainer.grad_clip, 0.0)
    _at_least("trainer.accumulate", trainer.accumulate, 1)
    _at_least("trainer.l1", trainer.l1, 0.0)
    _at_least("trainer.overfit_batches", trainer.overfit_batches, 0)
    _at_least("trainer.checkpoint_every_n_steps", trainer.checkpoint_every_n_steps, 0)
    _at_least("trainer.keep_checkpoints", trainer.keep_checkpoints, 0)
    _at_least("trainer.devices", trainer.devices, 1)
    if trainer.resume is not None and trainer.resume != "auto":
        path = Path(os.path.expanduser(trainer.resume))
        if not path.exists():
            raise UserError(
                f"trainer.resume: '{trainer.resume}' does not exist; give a checkpoint file, a run directory or auto"
            )
    if not 0.0 <= trainer.label_smoothing < 1.0:
        raise UserError(
            f"trainer.label_smoothing={trainer.label_smoothing} is out of range; use a value in [0, 1), e.g. 0.1"
        )
    for key in ("patience", "limit_train_batches", "limit_val_batches", "limit_test_batches", "threads"):
        value = getattr(trainer, key)
        if value is not None:
            _at_least(f"trainer.{key}", value, 0 if key == "patience" else 1)

    check_data(cfg.data, files=cfg.get("task", "train") in ("train", "evaluate"))  # predict/export read no dataset

    if "finetune" in cfg:
        _check_finetune(_typed(cfg.finetune, FinetuneSchema, "finetune"))

    for key in ("mixup_alpha", "cutmix_alpha"):
        _at_least(f"augmentation.{key}", getattr(augmentation, key), 0.0)
    if (augmentation.mixup_alpha or augmentation.cutmix_alpha) and trainer.loss != "cross_entropy":
        raise UserError("augmentation mixup/cutmix needs trainer.loss=cross_entropy (soft targets)")

    if trainer.label_smoothing and trainer.loss != "cross_entropy":
        raise UserError(
            f"trainer.label_smoothing={trainer.label_smoothing} applies to trainer.loss=cross_entropy only "
            f"(loss is {trainer.loss}); set trainer.label_smoothing=0"
        )

    _check_optimizer(cfg.optimizer)
    prune = cfg.get("prune") or {}
    _check_prune(prune)
    ensemble = _typed(cfg.ensemble, EnsembleSchema, "ensemble")
    fuses = uses_ensemble(cfg)
    _check_ensemble(ensemble, fuses, bool(cfg.model.get("weights")), trainer, cfg.get("cv"))
    # With pruning, the scheduler also sizes the fine-tuning: trainer.epochs=0 prunes a loaded model.
    # An ensemble of loaded members (no ensemble.members) trains nothing with trainer.epochs=0.
    sized = prune.get("name", "none") == "none" and not (fuses and not ensemble.members)
    _check_scheduler(cfg.scheduler, trainer.epochs if sized else 1)
    _check_structured_support(cfg)
    if "cv" in cfg:
        _check_cv(_typed(cfg.cv, CVSchema, "cv"), trainer)
    if "gate" in cfg:
        _check_gates(cfg.gate)
    _check_task(cfg)
    if not isinstance(cfg.get("plots", True), bool):
        raise UserError(f"plots={cfg.plots!r} is invalid; use true or false")
    _check_loggers(cfg.get("logger"))


def check_data(node: DictConfig, files: bool = True) -> None:
    """The data group's checks, and with `files` that data.root is there, so that a mistyped path is named before
    torch is imported. build_data() runs them too, for callers that skip validate()."""
    data = _typed(node, DataSchema, "data")
    if data.source is None:
        _one_of("data.name", data.name, DATASETS)
    if data.image_size is not None:
        _at_least("data.image_size", data.image_size, 1)
    _at_least("data.batch_size", data.batch_size, 1)
    _at_least("data.num_workers", data.num_workers, 0)
    if data.eval_batch_size is not None:
        _at_least("data.eval_batch_size", data.eval_batch_size, 1)
    if data.channels is not None:
        _one_of("data.channels", data.channels, (1, 3))
    for key in ("val_fraction", "test_fraction"):
        value = getattr(data, key)
        if not 0.0 <= value < 1.0:
            raise UserError(f"data.{key}={value} is out of range; use a fraction in [0, 1), e.g. 0.1")
    if data.val_fraction + data.test_fraction >= 1.0:
        raise UserError(
            f"data.val_fraction + data.test_fraction = {data.val_fraction + data.test_fraction:g} leaves "
            "no training data; keep their sum below 1, e.g. data.val_fraction=0.1 data.test_fraction=0.2"
        )
    if (data.mean is None) != (data.std is None) or (data.mean is not None and len(data.mean) != len(data.std or [])):
        raise UserError("data.mean and data.std must both be null or lists of the same length")
    if data.std is not None and any(s <= 0 for s in data.std):
        raise UserError(f"data.std={list(data.std)} must be positive")
    if data.limit_samples is not None:
        _at_least("data.limit_samples", data.limit_samples, 1)
    if data.samples_per_class is not None:
        _at_least("data.samples_per_class", data.samples_per_class, 1)
    if data.classes is not None and len(data.classes) < 2:
        raise UserError(
            f"data.classes={list(data.classes)} picks fewer than 2 classes; a classifier needs at least two"
        )
    if data.classes is not None and len(set(map(str, data.classes))) != len(data.classes):
        raise UserError(f"data.classes={list(data.classes)} names a class twice; list each class once")
    if data.name == "synthetic":
        for key in ("num_samples", "num_classes"):
            value = getattr(data, key)
            if value is None or value < 2:
                raise UserError(f"data.{key}={value} is out of range; data=synthetic needs at least 2")
    if files and data.source is None and (data.name in DATASET_FILES or data.name == "imagefolder"):
        _check_data_root(node)


def _check_data_root(data: DictConfig) -> None:
    root = data_root(data)
    if data.name == "imagefolder":
        if not root.is_dir():
            raise UserError(
                f"data.root: '{root}' does not exist; point data.root at a folder laid out as {IMAGEFOLDER_LAYOUT}"
            )
        if not (root / "train").is_dir():
            raise UserError(
                f"data.root: '{root}' has no train/ folder; lay the images out as {root}/{IMAGEFOLDER_LAYOUT}"
            )
    elif not data.download and not root.is_dir():
        raise UserError(
            f"data.root: '{root}' does not exist; point data.root at a folder holding {DATASET_FILES[data.name][0]} "
            "or set data.download=true"
        )


def data_root(data: DictConfig) -> Path:
    """data.root as an absolute path (relative ones are taken from where the user launched the run)."""
    if OmegaConf.is_missing(data, "root") or data.root is None:
        if data.name == "imagefolder":
            holding = f"an image folder laid out as {IMAGEFOLDER_LAYOUT}"
        else:
            title, expected = DATASET_FILES[data.name]
            holding = f"{title} (it should contain {expected})"
        raise UserError(f"data.root: not set; set data.root to a folder holding {holding}")
    return Path(to_absolute_path(os.path.expanduser(str(data.root))))


def _check_task(cfg: DictConfig) -> None:
    _one_of("task", cfg.task, TASKS)
    _one_of("evaluate.split", _typed(cfg.evaluate, EvaluateSchema, "evaluate").split, SPLITS)
    _at_least("predict.batch_size", _typed(cfg.predict, PredictSchema, "predict").batch_size, 1)
    export = _typed(cfg.export, ExportSchema, "export")
    _one_of("export.format", export.format, EXPORT_FORMATS)
    if export.tolerance <= 0:
        raise UserError(f"export.tolerance={export.tolerance} must be > 0, e.g. 1e-4")
    weights = cfg.model.get("weights")
    if cfg.task != "train" and not weights:
        raise UserError(f"task={cfg.task} needs the trained model: add model.weights=<run directory or checkpoint>")
    if cfg.task == "predict" and not cfg.predict.input:
        raise UserError("task=predict needs images: add predict.input=<folder of images>")


def _check_loggers(loggers: DictConfig | None) -> None:
    """Each entry of `logger` is a packaged logger or one of the user's with a `_target_`."""
    for name, options in (loggers or {}).items():
        if name not in LOGGERS and not (isinstance(options, DictConfig) and options.get("_target_")):
            raise UserError(
                f"logger.{name} is not a logger; choose from {', '.join(LOGGERS)} "
                "(several at once: logger=[csv,tensorboard]) or give it a _target_"
            )


def _check_finetune(finetune: FinetuneSchema) -> None:
    _one_of("finetune.policy", finetune.policy, POLICIES)
    _at_least("finetune.unfreeze_at", finetune.unfreeze_at, 0)
    _at_least("finetune.unfreeze_every", finetune.unfreeze_every, 1)
    _at_least("finetune.backbone_lr_mult", finetune.backbone_lr_mult, 0.0)
    if not 0.0 < finetune.layer_decay <= 1.0:
        raise UserError(
            f"finetune.layer_decay={finetune.layer_decay} is out of range; "
            "use a value in (0, 1], e.g. 0.75 (1 disables it)"
        )


def _check_optimizer(optimizer: DictConfig) -> None:
    if not optimizer.get("_target_"):
        raise UserError("optimizer._target_ is missing; pick an option, e.g. optimizer=adamw")
    lr = optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise UserError(
            f"optimizer.lr={lr!r} is invalid; the learning rate must be a number > 0, e.g. optimizer.lr=0.01"
        )
    decay = optimizer.get("weight_decay", 0.0)
    if not isinstance(decay, (int, float)) or decay < 0:
        raise UserError(f"optimizer.weight_decay={decay!r} is invalid; use a number >= 0, e.g. 5e-4")


def _check_scheduler(scheduler: DictConfig, epochs: int) -> None:
    interval = scheduler.get("interval", "epoch")
    _one_of("scheduler.interval", interval, ("epoch", "step"))
    if "ReduceLROnPlateau" in str(scheduler.get("_target_")) and interval != "epoch":
        raise UserError(
            "scheduler=plateau steps on the validation metric, once per epoch; set scheduler.interval=epoch"
        )
    if scheduler.get("_target_") and "total_steps" in scheduler and epochs == 0:
        raise UserError(
            "scheduler needs trainer.epochs > 0 to size its schedule; use scheduler=none with trainer.epochs=0"
        )


def uses_ensemble(cfg: DictConfig) -> bool:
    """Whether a run fuses members: a rule is chosen, or model.weights names an ensemble run directory."""
    return cfg.ensemble.name != "none" or ensemble_dir(cfg.model.get("weights")) is not None


def _check_ensemble(
    ensemble: EnsembleSchema, fuses: bool, model_weights: bool, trainer: TrainerSchema, cv: DictConfig | None
) -> None:
    """Values and combinations; member counts (ensemble.weights) and paths are checked when members are gathered."""
    _one_of("ensemble.name", ensemble.name, ENSEMBLE_RULES)
    if fuses:
        if trainer.resume is not None and (
            trainer.resume == "auto" or not Path(os.path.expanduser(trainer.resume)).is_dir()
        ):
            raise UserError(
                f"trainer.resume={trainer.resume}: an ensemble run resumes from its run directory "
                "(trainer.resume=<run dir>); auto and checkpoint files apply to single runs"
            )
        if cv is not None and cv.get("folds"):
            raise UserError("cv.folds does not apply to an ensemble run; set cv.folds=0 or ensemble=none")
    members = ensemble.members
    if isinstance(members, bool) or not (
        members is None
        or isinstance(members, int)
        and members >= 1
        or isinstance(members, list)
        and members
        and all(isinstance(m, (str, list, dict)) for m in members)
    ):
        raise UserError(
            f"ensemble.members={members!r} is invalid; use a count >= 1 (e.g. ensemble.members=3) or a list of "
            "override sets, one per member, e.g. \"ensemble.members=['model=cnn','model=resnet18']\""
        )
    checkpoints = ensemble.checkpoints if isinstance(ensemble.checkpoints, list) else [ensemble.checkpoints]
    if not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in checkpoints):  # a dir may be named 1
        raise UserError(
            f"ensemble.checkpoints={checkpoints!r} is invalid; give run directories or checkpoint files, "
            "e.g. ensemble.checkpoints=[outputs/A,outputs/B/checkpoints/best.pt]"
        )
    sources = [
        key
        for key, value in (("members", members), ("checkpoints", ensemble.checkpoints), ("sweep", ensemble.sweep))
        if value
    ]
    if ensemble.members and trainer.epochs == 0:
        raise UserError(
            "ensemble.members trains its members in this run and needs trainer.epochs > 0; "
            "to fuse trained models set ensemble.checkpoints or ensemble.sweep instead"
        )
    if ensemble.name == "none" and sources:
        raise UserError(
            f"ensemble.{sources[0]} is set but ensemble=none; pick a rule to fuse the members: "
            "ensemble=average, ensemble=weighted or ensemble=vote"
        )
    if ensemble.name != "none" and not sources and not model_weights:
        raise UserError(
            f"ensemble={ensemble.name} has no members; set ensemble.members=K (train K here), "
            "ensemble.checkpoints=[run dirs or .pt files] or ensemble.sweep=<multirun dir>"
        )
    if ensemble.top_k is not None:
        _at_least("ensemble.top_k", ensemble.top_k, 1)
        if not ensemble.sweep:
            raise UserError("ensemble.top_k picks jobs of a sweep; set ensemble.sweep=<multirun dir> too")
    if ensemble.weights is not None:
        if ensemble.name != "weighted":
            raise UserError(f"ensemble.weights is used by ensemble=weighted, not ensemble={ensemble.name}")
        if any(w < 0 for w in ensemble.weights) or sum(ensemble.weights) <= 0:
            raise UserError(f"ensemble.weights={list(ensemble.weights)} must be >= 0 with a positive sum")
    if ensemble.temperature <= 0:
        raise UserError(f"ensemble.temperature={ensemble.temperature} is out of range; it must be > 0, e.g. 0.5")
    _one_of("ensemble.vmap", ensemble.vmap, ("auto", True, False))


def _check_structured_support(cfg: DictConfig) -> None:
    """Architectures torch-pruning's dependency graph cannot prune structurally fail here, not after training."""
    prune = cfg.get("prune")
    if prune is None or prune.get("name") != "structured":
        return
    model = str(cfg.model.get("name") or cfg.model.get("_target_") or "")
    unsupported = [family for family in STRUCTURED_UNSUPPORTED if model.lower().startswith(family)]
    if unsupported:
        raise UserError(
            f"prune=structured cannot prune model {model!r}: torch-pruning does not handle {unsupported[0]} "
            "models (channel shuffles / shifted windows); use prune=magnitude or a resnet, mobilenet or efficientnet"
        )


def _check_cv(cv: CVSchema, trainer: TrainerSchema) -> None:
    if cv.folds < 0 or cv.folds == 1:
        raise UserError(f"cv.folds={cv.folds} is invalid; use 0 (off) or a number of folds >= 2, e.g. cv.folds=5")
    if cv.folds and trainer.epochs == 0:
        raise UserError(
            "cv.folds needs trainer.epochs > 0 (every fold trains a model); set trainer.epochs or cv.folds=0"
        )


def _check_gates(gate: DictConfig) -> None:
    from shelltrain.gates import parse_key

    limits: dict[tuple[str, str], float] = {}
    for key, value in gate.items():
        parsed = parse_key(str(key))
        if parsed is None:
            raise UserError(
                f"gate.{key}: a gate key is <metric>_min or <metric>_max, e.g. gate.test_acc_min=0.9 "
                "or gate.wall_seconds_max=600"
            )
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise UserError(f"gate.{key}={value!r} is invalid; a gate limit is a number, e.g. gate.{key}=0.9")
        limits[parsed] = float(value)
    for (metric, bound), low in limits.items():
        high = limits.get((metric, "max"))
        if bound == "min" and high is not None and low > high:
            raise UserError(f"gate.{metric}_min={low:g} > gate.{metric}_max={high:g}: no run can pass both")


def _check_prune(prune: Any) -> None:
    """Values of the `prune` group; which keys exist is up to each option's YAML (Hydra rejects others)."""
    name = prune.get("name", "none")
    if name == "none":
        return
    _one_of("prune.name", name, tuple(PRUNE_SCHEDULES))
    if "schedule" in prune:
        schedules = PRUNE_SCHEDULES[name]
        if prune.schedule not in schedules:
            raise UserError(
                f"prune.schedule={prune.schedule!r} is not available for prune={name}; "
                f"choose one of {', '.join(schedules)}"
            )
    fractions = {"amount": "sparsity", "ratio": "channel ratio"}
    for key, what in fractions.items():
        if key in prune and not (isinstance(prune[key], (int, float)) and 0.0 <= prune[key] < 1.0):
            raise UserError(f"prune.{key}={prune[key]!r} is out of range; the {what} must be in [0, 1), e.g. 0.5")
    minimums = {
        "threshold": 0.0,
        "steps": 1,
        "finetune_epochs": 0,
        "max_acc_drop": 0.0,
        "blocks": 1,
        "calibration_batches": 1,
        "latency_batch": 1,
        "latency_threads": 1,
        "latency_repeats": 1,
    }
    for key, minimum in minimums.items():
        if key in prune:
            _number(f"prune.{key}", prune[key], integer=isinstance(minimum, int))
            _at_least(f"prune.{key}", prune[key], minimum)
    if "finetune_lr_mult" in prune:
        _number("prune.finetune_lr_mult", prune.finetune_lr_mult)
        if prune.finetune_lr_mult <= 0:
            raise UserError(f"prune.finetune_lr_mult={prune.finetune_lr_mult} must be > 0, e.g. 0.1")
    if "bits" in prune:
        _number("prune.bits", prune.bits, integer=True)
        if not 2 <= prune.bits <= 8:
            raise UserError(f"prune.bits={prune.bits} is out of range; use 2 to 8 (8: int8 kernels, fewer: fake)")
    choices = {
        "importance": PRUNE_IMPORTANCES,
        "ramp": PRUNE_RAMPS,
        "mode": QUANTIZE_MODES,
        "backend": QUANTIZE_BACKENDS,
    }
    for key, allowed in choices.items():
        if key in prune:
            _one_of(f"prune.{key}", prune[key], allowed)
    if "global" in prune and not isinstance(prune["global"], bool):
        raise UserError(f"prune.global={prune['global']!r} must be true or false")


def _number(key: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise UserError(f"{key}={value!r} has the wrong type; it must be {'an integer' if integer else 'a number'}")


def _typed(node: DictConfig, schema: type, key: str) -> Any:
    """Merge a group into its schema: wrong types and unknown keys fail here with the full key."""
    try:
        # Resolve first: a group's interpolations (e.g. ${data.image_size}) point outside the group.
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=True))
    except ValidationError as exc:
        raise UserError(f"{key}.{exc.full_key}={exc.value!r} has the wrong type; {exc.msg.splitlines()[0]}") from None
    except ConfigKeyError as exc:
        allowed = ", ".join(f.name for f in schema.__dataclass_fields__.values())
        raise UserError(f"unknown key '{key}.{exc.key}'; valid keys of {key}: {allowed}") from None
    return OmegaConf.to_object(merged)


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise UserError(f"{key}={value} is out of range; it must be >= {minimum}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is invalid; choose one of {', '.join(map(str, allowed))}")
