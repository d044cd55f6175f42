"""One dataclass per config group: its keys, types and defaults, with the checks of its own values beside them.

`register()` stores each in Hydra's ConfigStore as `<group>_schema`, which every packaged YAML option names first
in its defaults list (`/trainer_schema@_here_`): Hydra types each key while composing. The YAML carries the values
and the comments listing each key's choices; a dataclass default equals the group's default option's value.
`validate(cfg)` runs every check before any data is loaded (a group from --config-dir need not name its schema, so
each is merged into its dataclass again); shelltrain.checks holds those no dataclass owns. No torch, no Hydra at
import: the engine takes TrainerConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from shelltrain import schema_values as values
from shelltrain.checks import (
    at_least,
    check_balance,
    check_checkpoint,
    check_ensemble_run,
    check_fractions,
    check_gates,
    check_loggers,
    check_optimizer,
    check_scheduler,
    check_structured_support,
    check_task,
    check_workers,
    in_unit_interval,
    one_of,
    positive,
    to_schema,
    uses_ensemble,
)
from shelltrain.dataroot import DATASET_FILES, check_data_root
from shelltrain.errors import UserError
from shelltrain.schema_tasks import EvaluateConfig, ExportConfig, LrFindConfig, PredictConfig, ReportConfig


@dataclass
class EmaConfig:
    """trainer.ema: an exponential moving average of the weights (shelltrain.averaging); decay null = off."""

    decay: Optional[float] = None
    every_n_steps: int = 1
    warmup_steps: int = 0

    def check(self) -> None:
        if self.decay is not None and not 0.0 < self.decay < 1.0:
            raise UserError(f"trainer.ema.decay={self.decay} is out of range; use a value in (0, 1), e.g. 0.999")
        at_least("trainer.ema.every_n_steps", self.every_n_steps, 1)
        at_least("trainer.ema.warmup_steps", self.warmup_steps, 0)


@dataclass
class SwaConfig:
    """trainer.swa: stochastic weight averaging (shelltrain.averaging); start_epoch null = off."""

    start_epoch: Optional[int] = None
    lr: float = 0.01

    def check(self) -> None:
        at_least("trainer.swa.start_epoch", self.start_epoch, 1)
        positive("trainer.swa.lr", self.lr, "0.01")


@dataclass
class TrainerConfig:
    """The `trainer` group, and the settings the engine trains with. In the config `device` is auto, cpu, cuda or
    cuda:N; the runner replaces it with the resolved device (a string such as "cuda:0", or a torch.device)."""

    epochs: int = 8
    device: str = "auto"
    precision: str = "32"
    channels_last: bool = True
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
    ema: EmaConfig = field(default_factory=EmaConfig)
    swa: SwaConfig = field(default_factory=SwaConfig)
    test_tta: str = "none"
    calibrate: str = "none"
    profile: bool = False

    def check(self) -> None:
        at_least("trainer.epochs", self.epochs, 0)
        self.ema.check()
        self.swa.check()
        if self.swa.start_epoch is not None and self.swa.start_epoch > self.epochs:
            raise UserError(f"trainer.swa.start_epoch={self.swa.start_epoch} is after the last epoch ({self.epochs})")
        one_of("trainer.test_tta", self.test_tta, values.TTA_MODES)
        one_of("trainer.calibrate", self.calibrate, values.CALIBRATIONS)
        if self.monitor.startswith("ema_") and self.ema.decay is None:
            raise UserError(f"trainer.monitor={self.monitor} needs the EMA; set trainer.ema.decay, e.g. 0.999")
        one_of("trainer.precision", self.precision, values.PRECISIONS)
        one_of("trainer.loss", self.loss, values.LOSSES)
        one_of("trainer.monitor", self.monitor, values.MONITORS)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"trainer.device={self.device!r} is invalid; use auto, cpu, cuda or cuda:N")
        for key in ("grad_clip", "l1"):
            at_least(f"trainer.{key}", getattr(self, key), 0.0)
        at_least("trainer.accumulate", self.accumulate, 1)
        for key in ("overfit_batches", "checkpoint_every_n_steps", "keep_checkpoints"):
            at_least(f"trainer.{key}", getattr(self, key), 0)
        at_least("trainer.devices", self.devices, 1)
        if self.resume is not None and self.resume != "auto" and not Path(os.path.expanduser(self.resume)).exists():
            raise UserError(
                f"trainer.resume: '{self.resume}' does not exist; give a checkpoint file, a run directory or auto"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(
                f"trainer.label_smoothing={self.label_smoothing} is out of range; use a value in [0, 1), e.g. 0.1"
            )
        for key in ("patience", "limit_train_batches", "limit_val_batches", "limit_test_batches", "threads"):
            at_least(f"trainer.{key}", getattr(self, key), 0 if key == "patience" else 1)
        if self.label_smoothing and self.loss != "cross_entropy":
            raise UserError(
                f"trainer.label_smoothing={self.label_smoothing} applies to trainer.loss=cross_entropy only "
                f"(loss is {self.loss}); set trainer.label_smoothing=0"
            )


@dataclass
class DataConfig:
    """The `data` group. `source` (a `_target_` that builds the user's dataset) frees `name` from the packaged
    datasets and skips their root/files checks. `mean`/`std` are facts of a dataset: null measures them."""

    name: str = "digits"
    source: Optional[Any] = None
    root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = 32  # null: the input size of model.weights
    channels: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    num_workers: Any = 0  # a count, or "auto": the process's CPU cores, at most 8 (the file-backed sets' default)
    drop_last: bool = False
    persistent_workers: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    limit_samples: Optional[int] = None
    num_samples: Optional[int] = None
    num_classes: Optional[int] = None
    classes: Optional[list[Any]] = None
    samples_per_class: Optional[int] = None
    on_device: bool = False
    imbalance: Optional[float] = None
    balance: str = "none"
    cache: str = "none"  # memory | disk: image folders decoded once (data/cache.py)
    cache_dir: Optional[str] = None  # null: $XDG_CACHE_HOME/shelltrain or ~/.cache/shelltrain
    cache_max_memory: float = 8.0  # GiB; a larger data.cache=memory array is read memory-mapped

    def check(self) -> None:
        at_least("data.imbalance", self.imbalance, 1.0)
        one_of("data.balance", self.balance, values.BALANCES)
        if self.balance == "sampler" and self.on_device:
            raise UserError("data.balance=sampler draws through a DataLoader; set data.on_device=false")
        if self.source is None:
            one_of("data.name", self.name, values.DATASETS)
        at_least("data.image_size", self.image_size, 1)
        at_least("data.batch_size", self.batch_size, 1)
        check_workers(self.num_workers)
        at_least("data.eval_batch_size", self.eval_batch_size, 1)
        if self.channels is not None:
            one_of("data.channels", self.channels, (1, 3))
        check_fractions(self.val_fraction, self.test_fraction)
        one_of("data.cache", self.cache, values.CACHE_MODES)
        at_least("data.cache_max_memory", self.cache_max_memory, 0)
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise UserError("data.mean and data.std must both be null or lists of the same length")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UserError(f"data.std={list(self.std)} must be positive")
        at_least("data.limit_samples", self.limit_samples, 1)
        at_least("data.samples_per_class", self.samples_per_class, 1)
        if self.classes is not None and len(self.classes) < 2:
            raise UserError(f"data.classes={list(self.classes)} picks fewer than 2 classes; a classifier needs two")
        if self.classes is not None and len(set(map(str, self.classes))) != len(self.classes):
            raise UserError(f"data.classes={list(self.classes)} names a class twice; list each class once")
        if self.name == "synthetic" and self.source is None:
            for key in ("num_samples", "num_classes"):
                if (value := getattr(self, key)) is None or value < 2:
                    raise UserError(f"data.{key}={value} is out of range; data=synthetic needs at least 2")


@dataclass
class ModelConfig:
    """The `model` group for a packaged or torchvision architecture (a model with a `_target_` is free-form)."""

    name: str = "resnet18"
    width: Optional[int] = None  # cnn only
    small_input: bool = False
    dropout: float = 0.0
    weights: Optional[str] = None
    strict: bool = False
    library: str = "torchvision"  # torchvision | timm (model=timm)
    pretrained_file: Optional[str] = None  # timm: a local weights file for model.weights=timm (offline)


@dataclass
class FinetuneConfig:
    policy: str = "full"
    unfreeze_at: int = 0
    unfreeze_every: int = 1
    backbone_lr_mult: float = 1.0
    layer_decay: float = 1.0
    freeze_bn: bool = True

    def check(self) -> None:
        one_of("finetune.policy", self.policy, values.POLICIES)
        at_least("finetune.unfreeze_at", self.unfreeze_at, 0)
        at_least("finetune.unfreeze_every", self.unfreeze_every, 1)
        at_least("finetune.backbone_lr_mult", self.backbone_lr_mult, 0.0)
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(
                f"finetune.layer_decay={self.layer_decay} is out of range; "
                "use a value in (0, 1], e.g. 0.75 (1 disables it)"
            )


@dataclass
class AugmentationConfig:
    name: str = "none"
    train: list[Any] = field(default_factory=list)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def check(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            at_least(f"augmentation.{key}", getattr(self, key), 0.0)


@dataclass
class EnsembleConfig:
    name: str = "none"
    members: Any = None
    checkpoints: Any = field(default_factory=list)  # a list, or one path
    sweep: Optional[str] = None
    top_k: Optional[int] = None
    weights: Optional[list[float]] = None
    temperature: float = 1.0
    vmap: Any = "auto"

    def check(self) -> None:
        """Values and combinations of the group itself; member counts and paths are checked when gathered."""
        one_of("ensemble.name", self.name, values.ENSEMBLE_RULES)
        members = self.members
        as_list = isinstance(members, list) and members and all(isinstance(m, (str, list, dict)) for m in members)
        if isinstance(members, bool) or not (members is None or isinstance(members, int) and members >= 1 or as_list):
            raise UserError(
                f"ensemble.members={members!r} is invalid; use a count >= 1 (e.g. ensemble.members=3) or a list of "
                "override sets, one per member, e.g. \"ensemble.members=['model=cnn','model=resnet18']\""
            )
        checkpoints = self.checkpoints if isinstance(self.checkpoints, list) else [self.checkpoints]
        if not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in checkpoints):  # a dir may be named 1
            raise UserError(
                f"ensemble.checkpoints={checkpoints!r} is invalid; give run directories or checkpoint files, "
                "e.g. ensemble.checkpoints=[outputs/A,outputs/B/checkpoints/best.pt]"
            )
        at_least("ensemble.top_k", self.top_k, 1)
        if self.top_k is not None and not self.sweep:
            raise UserError("ensemble.top_k picks jobs of a sweep; set ensemble.sweep=<multirun dir> too")
        if self.weights is not None:
            if self.name != "weighted":
                raise UserError(f"ensemble.weights is used by ensemble=weighted, not ensemble={self.name}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise UserError(f"ensemble.weights={list(self.weights)} must be >= 0 with a positive sum")
        positive("ensemble.temperature", self.temperature, "0.5")
        one_of("ensemble.vmap", self.vmap, ("auto", True, False))

    def sources(self) -> list[str]:
        """Where members come from: the keys among members, checkpoints and sweep that are set."""
        given = (("members", self.members), ("checkpoints", self.checkpoints), ("sweep", self.sweep))
        return [key for key, value in given if value]


class PruneConfig:
    """The `prune` group: every method's keys (each reads its own; configs/prune/none.yaml describes them), and
    `global`, added below by name: a Python keyword cannot be a parameter of a generated __init__."""

    name: str = "none"
    schedule: str = "oneshot"
    steps: int = 3
    ramp: str = "linear"
    max_acc_drop: float = 0.01
    finetune_epochs: int = 1
    finetune_lr_mult: float = 0.1
    amount: float = 0.5  # magnitude, random
    ratio: float = 0.5  # structured
    importance: str = "l1"  # structured
    threshold: float = 0.01  # threshold
    blocks: int = 1  # layer
    mode: str = "auto"  # quantize
    bits: int = 8  # quantize
    backend: str = "x86"  # quantize
    calibration_batches: int = 8  # quantize
    latency_batch: int = 32
    latency_threads: int = 1
    latency_repeats: int = 10
    distill: bool = False
    distill_temperature: float = 1.0  # prune.distill's T and alpha (docs/distillation.md: measured recovery)
    distill_alpha: float = 0.5
    then: Optional[list[str]] = None  # further compression steps, each a method on the previous step's result
    modules: Optional[list[str]] = None  # layer name patterns a method may touch (prune/context.py: chosen_names)
    exclude: Optional[list[str]] = None  # layer name patterns it leaves alone

    def __init__(self, **keys: Any) -> None:
        for key, value in keys.items():
            setattr(self, key, value)

    def check(self) -> None:
        if self.name == "none":
            return
        one_of("prune.name", self.name, tuple(values.PRUNE_SCHEDULES))
        schedules = values.PRUNE_SCHEDULES[self.name]
        if self.schedule not in schedules:
            raise UserError(
                f"prune.schedule={self.schedule!r} is not available for prune={self.name}; "
                f"choose one of {', '.join(schedules)}"
            )
        for key, what in (("amount", "sparsity"), ("ratio", "channel ratio")):
            if not 0.0 <= (value := getattr(self, key)) < 1.0:
                raise UserError(f"prune.{key}={value!r} is out of range; the {what} must be in [0, 1), e.g. 0.5")
        for key, minimum in (("threshold", 0.0), ("max_acc_drop", 0.0), ("finetune_epochs", 0)):
            at_least(f"prune.{key}", getattr(self, key), minimum)
        for key in ("steps", "blocks", "calibration_batches", "latency_batch", "latency_threads", "latency_repeats"):
            at_least(f"prune.{key}", getattr(self, key), 1)
        positive("prune.finetune_lr_mult", self.finetune_lr_mult, "0.1")
        positive("prune.distill_temperature", self.distill_temperature, "1")
        in_unit_interval("prune.distill_alpha", self.distill_alpha)
        if not 2 <= self.bits <= 8:
            raise UserError(f"prune.bits={self.bits} is out of range; use 2 to 8 (8: int8 kernels, fewer: fake)")
        one_of("prune.importance", self.importance, values.PRUNE_IMPORTANCES)
        one_of("prune.ramp", self.ramp, values.PRUNE_RAMPS)
        one_of("prune.mode", self.mode, values.QUANTIZE_MODES)
        one_of("prune.backend", self.backend, values.QUANTIZE_BACKENDS)
        steps = [self.name, *(self.then or [])]
        for step in steps[1:]:
            one_of("prune.then", step, tuple(values.PRUNE_SCHEDULES))
        if "quantize" in steps[:-1]:
            raise UserError(f"prune.then: quantize must be the last step ({' -> '.join(steps)}); move it to the end")


PruneConfig.__annotations__["global"] = "bool"
setattr(PruneConfig, "global", True)
PruneConfig = dataclass(init=False, repr=False, eq=False)(PruneConfig)


@dataclass
class DistillConfig:
    """The `distill` group: a student trained against a teacher's temperature-softened outputs (shelltrain.distill)."""

    name: str = "none"
    teacher: Optional[str] = None  # a run directory, a checkpoint or an ensemble run directory
    sweep: Optional[str] = None  # or the best top_k finished jobs of a multirun directory, averaged
    top_k: Optional[int] = None
    temperature: float = 4.0
    alpha: float = 0.9
    cache: Optional[bool] = None  # teacher logits computed once per image; null: when augmentation=none

    def check(self) -> None:
        one_of("distill.name", self.name, values.DISTILL_METHODS)
        at_least("distill.top_k", self.top_k, 1)
        if self.name != "none" and bool(self.teacher) == bool(self.sweep):
            raise UserError(
                "distill: give the teacher as distill.teacher=<run dir, checkpoint or ensemble run dir> "
                "or distill.sweep=<multirun dir> (one of them)"
            )
        positive("distill.temperature", self.temperature, "4")
        in_unit_interval("distill.alpha", self.alpha, " (1: teacher only)")


@dataclass
class CVConfig:
    folds: int = 0
    refit: bool = True

    def check(self, trainer: TrainerConfig) -> None:
        if self.folds < 0 or self.folds == 1:
            raise UserError(f"cv.folds={self.folds} is invalid; use 0 (off) or a number of folds >= 2, e.g. cv.folds=5")
        if self.folds and trainer.epochs == 0:
            raise UserError(
                "cv.folds needs trainer.epochs > 0 (every fold trains a model); set trainer.epochs or cv.folds=0"
            )


# key of the composed config -> its dataclass; stored in the ConfigStore as `<key>_schema`
SCHEMAS: dict[str, type] = {
    "trainer": TrainerConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "finetune": FinetuneConfig,
    "augmentation": AugmentationConfig,
    "ensemble": EnsembleConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "cv": CVConfig,
    "evaluate": EvaluateConfig,
    "predict": PredictConfig,
    "export": ExportConfig,
    "report": ReportConfig,
    "lr_find": LrFindConfig,
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore; importing shelltrain.configs calls this before Hydra composes."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for key, schema in SCHEMAS.items():
        store.store(name=f"{key}_schema", node=schema)


def validate(cfg: DictConfig) -> None:
    """Raise UserError with one line for the first bad value in the composed config."""
    trainer = trainer_config(cfg.trainer)
    trainer.check()
    if "_target_" not in cfg.model:
        to_schema(cfg.model, ModelConfig, "model")
    augmentation = to_schema(cfg.augmentation, AugmentationConfig, "augmentation")
    augmentation.check()
    if (augmentation.mixup_alpha or augmentation.cutmix_alpha) and trainer.loss != "cross_entropy":
        raise UserError("augmentation mixup/cutmix needs trainer.loss=cross_entropy (soft targets)")
    check_data(cfg.data, files=cfg.get("task", "train") in ("train", "evaluate"))  # predict/export read no dataset
    if "finetune" in cfg:
        to_schema(cfg.finetune, FinetuneConfig, "finetune").check()
    check_optimizer(cfg.optimizer)
    prune = to_schema(cfg.get("prune") or {}, PruneConfig, "prune")
    prune.check()
    ensemble = to_schema(cfg.ensemble, EnsembleConfig, "ensemble")
    ensemble.check()
    fuses = uses_ensemble(cfg)
    check_ensemble_run(ensemble, fuses, bool(cfg.model.get("weights")), trainer, cfg.get("cv"))
    # With pruning, the scheduler also sizes the fine-tuning: trainer.epochs=0 prunes a loaded model.
    # An ensemble of loaded members (no ensemble.members) trains nothing with trainer.epochs=0.
    sized = prune.name == "none" and not (fuses and not ensemble.members)
    check_scheduler(cfg.scheduler, trainer.epochs if sized else 1)
    check_structured_support(cfg)
    if "distill" in cfg:
        to_schema(cfg.distill, DistillConfig, "distill").check()
    if "cv" in cfg:
        to_schema(cfg.cv, CVConfig, "cv").check(trainer)
    if "gate" in cfg:
        check_gates(cfg.gate)
    for key in ("evaluate", "predict", "export", "report", "lr_find"):
        to_schema(cfg.get(key) or {}, SCHEMAS[key], key).check()
    check_task(cfg)
    check_balance(cfg)
    if not isinstance(cfg.get("plots", True), bool):
        raise UserError(f"plots={cfg.plots!r} is invalid; use true or false")
    check_loggers(cfg.get("logger"))
    check_checkpoint(cfg.get("checkpoint"))


def trainer_config(node: DictConfig) -> TrainerConfig:
    """The `trainer` group as a TrainerConfig (what the engine takes, once `device` is resolved)."""
    return to_schema(node, TrainerConfig, "trainer")


def check_data(node: DictConfig, files: bool = True) -> None:
    """The data group's checks, and with `files` that data.root is there, so that a mistyped path is named before
    torch is imported. build_data() runs them too, for callers that skip validate()."""
    data = to_schema(node, DataConfig, "data")
    data.check()
    if files and data.source is None and (data.name in DATASET_FILES or data.name == "imagefolder"):
        check_data_root(node)
