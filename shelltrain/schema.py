"""One dataclass per config group: its keys, types and checks. The values live in one place only, the packaged YAML.

Why the YAML and not the dataclasses: a user reads, copies and overrides the YAML options, whose comments give each
key's one-line meaning and choices; `shelltrain --cfg job` prints the composed YAML. So the dataclasses hold no default
values (every field is required, MISSING to OmegaConf): nothing is written twice, and a key that no option sets fails
in one line (`to_schema`) instead of silently taking a value from a second copy. Code and tests that need a group's
settings without composing a run take them from the packaged default option with `defaults(key, **overrides)`.

`register()` stores each dataclass in Hydra's ConfigStore as `<group>_schema`, which every packaged YAML option names
first in its defaults list (`/trainer_schema@_here_`): Hydra types each key while composing. `validate(cfg)` runs
every check before any data is loaded (a group from --config-dir need not name its schema, so each is merged into its
dataclass again); shelltrain.checks holds the value helpers and the checks no dataclass owns. No torch at import, and
Hydra only when composing the defaults: the engine takes TrainerConfig."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from shelltrain import schema_values as values
from shelltrain.checks import (
    at_least,
    check_balance,
    check_checkpoint,
    check_gates,
    check_loggers,
    check_multi_label,
    check_optimizer,
    check_prune_list,
    check_scheduler,
    check_streamed,
    check_structured_support,
    check_task,
    finite_list,
    one_of,
    positive,
    to_schema,
    uses_ensemble,
)
from shelltrain.errors import UserError
from shelltrain.gates import check_baseline_settings, metric_gates
from shelltrain.host_memory import CACHE_MAX_MIB
from shelltrain.schema_compress import CompressConfig, DistillConfig, PruneConfig
from shelltrain.schema_data import DATA_OPTIONS, DataConfig, OutputConfig, check_data
from shelltrain.schema_tasks import AuditConfig, EvaluateConfig, ExportConfig, LrFindConfig, PredictConfig, ReportConfig


@dataclass
class EmaConfig:
    """trainer.ema: an exponential moving average of the weights (shelltrain.averaging); decay null = off."""

    decay: Optional[float]
    every_n_steps: int
    warmup: bool
    warmup_steps: int

    def check(self) -> None:
        if self.decay is not None and not 0.0 < self.decay < 1.0:
            raise UserError(f"trainer.ema.decay={self.decay} is out of range; use a value in (0, 1), e.g. 0.999")
        at_least("trainer.ema.every_n_steps", self.every_n_steps, 1)
        at_least("trainer.ema.warmup_steps", self.warmup_steps, 0)


@dataclass
class SwaConfig:
    """trainer.swa: stochastic weight averaging (shelltrain.averaging); start_epoch null = off."""

    start_epoch: Optional[int]
    lr: float

    def check(self) -> None:
        at_least("trainer.swa.start_epoch", self.start_epoch, 1)
        positive("trainer.swa.lr", self.lr, "0.01")


@dataclass
class TrainerConfig:
    """The `trainer` group, and the settings the engine trains with. In the config `device` is auto, cpu, cuda or
    cuda:N; the runner replaces it with the resolved device (a string such as "cuda:0", or a torch.device)."""

    epochs: int
    device: str
    precision: str
    channels_last: bool
    grad_clip: float
    accumulate: int
    seed: int
    deterministic: bool
    loss: str
    label_smoothing: float
    pos_weight: Optional[str]
    l1: float
    monitor: str
    patience: Optional[int]
    limit_train_batches: Optional[int]
    limit_val_batches: Optional[int]
    limit_test_batches: Optional[int]
    overfit_batches: int
    threads: Optional[int]
    host_memory_cache_mib: int
    resume: Optional[str]
    checkpoint_every_n_steps: int
    keep_checkpoints: int
    compile: bool
    sync_batchnorm: bool
    devices: int
    ema: EmaConfig
    swa: SwaConfig
    test_tta: str
    calibrate: str
    profile: bool

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
        if self.compile and self.sync_batchnorm:
            raise UserError(
                "trainer.compile=true with trainer.sync_batchnorm=true is not supported (torch.compile breaks or "
                "fails on SyncBatchNorm under DDP); set trainer.compile=false or trainer.sync_batchnorm=false"
            )
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
        if not 0 <= self.host_memory_cache_mib <= CACHE_MAX_MIB:
            raise UserError(
                f"trainer.host_memory_cache_mib={self.host_memory_cache_mib} is out of range; use 0 (the C library's "
                f"own policy) to {CACHE_MAX_MIB} MiB"
            )
        if self.label_smoothing and self.loss == "mse":
            raise UserError(
                f"trainer.label_smoothing={self.label_smoothing} applies to trainer.loss=cross_entropy only, or bce "
                f"(loss is {self.loss}); set trainer.label_smoothing=0"
            )


@dataclass
class ModelConfig:
    """The `model` group for a packaged or torchvision architecture (a model with a `_target_` is free-form)."""

    name: str
    width: Optional[int]
    small_input: bool
    dropout: float
    weights: Optional[str]
    strict: bool
    library: str
    pretrained_file: Optional[str]

    def check(self) -> None:
        at_least("model.width", self.width, 1)
        if self.name == "cnn" and self.width is None:
            raise UserError("model.width=None: model=cnn needs the channels of its first block, e.g. model.width=32")
        if self.name != "cnn" and self.width is not None:
            raise UserError(f"model.width={self.width} applies to model=cnn only (model is {self.name}); remove it")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} is out of range; use a value in [0, 1), e.g. 0.2")
        if self.pretrained_file and self.weights != "timm":
            raise UserError(
                f"model.pretrained_file is read by model.weights=timm only (model.weights is {self.weights}); "
                "add model.weights=timm (with model=timm) or remove model.pretrained_file"
            )


@dataclass
class FinetuneConfig:
    policy: str
    unfreeze_at: int
    unfreeze_every: int
    backbone_lr_mult: float
    layer_decay: float
    freeze_bn: bool

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
    name: str
    train: list[Any]
    mixup_alpha: float
    cutmix_alpha: float

    def check(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            at_least(f"augmentation.{key}", getattr(self, key), 0.0)


@dataclass
class EnsembleConfig:
    name: str
    members: Any
    checkpoints: Any
    sweep: Optional[str]
    top_k: Optional[int]
    weights: Optional[list[float]]
    temperature: float
    vmap: Any

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
            finite_list("ensemble.weights", self.weights)
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

    def check_run(self, fuses: bool, model_weights: bool, trainer: TrainerConfig, cv: CVConfig) -> None:
        """The group against the rest of the run: resuming, cross-validation, epochs, a rule without members."""
        if fuses:
            if trainer.resume is not None and (
                trainer.resume == "auto" or not Path(os.path.expanduser(trainer.resume)).is_dir()
            ):
                raise UserError(
                    f"trainer.resume={trainer.resume}: an ensemble run resumes from its run directory "
                    "(trainer.resume=<run dir>); auto and checkpoint files apply to single runs"
                )
            if cv.folds:
                raise UserError("cv.folds does not apply to an ensemble run; set cv.folds=0 or ensemble=none")
        sources = self.sources()
        if self.members and trainer.epochs == 0:
            raise UserError(
                "ensemble.members trains its members in this run and needs trainer.epochs > 0; "
                "to fuse trained models set ensemble.checkpoints or ensemble.sweep instead"
            )
        if self.name == "none" and sources:
            raise UserError(
                f"ensemble.{sources[0]} is set but ensemble=none; pick a rule to fuse the members: "
                "ensemble=average, ensemble=weighted or ensemble=vote"
            )
        if self.name != "none" and not sources and not model_weights:
            raise UserError(
                f"ensemble={self.name} has no members; set ensemble.members=K (train K here), "
                "ensemble.checkpoints=[run dirs or .pt files] or ensemble.sweep=<multirun dir>"
            )


@dataclass
class CVConfig:
    folds: int
    refit: bool

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
    "audit": AuditConfig,
    "compress": CompressConfig,
    "output": OutputConfig,
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore; importing shelltrain.configs calls this before Hydra composes."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for key, schema in SCHEMAS.items():
        store.store(name=f"{key}_schema", node=schema)
    for name, schema in DATA_OPTIONS.items():
        store.store(name=f"data_{name}_schema", node=schema)


def validate(cfg: DictConfig) -> None:
    """Raise UserError with one line for the first bad value in the composed config."""
    trainer = trainer_config(cfg.trainer)
    trainer.check()
    if "_target_" not in cfg.model:
        to_schema(cfg.model, ModelConfig, "model").check()
    augmentation = to_schema(cfg.augmentation, AugmentationConfig, "augmentation")
    augmentation.check()
    if (augmentation.mixup_alpha or augmentation.cutmix_alpha) and trainer.loss != "cross_entropy":
        raise UserError("augmentation mixup/cutmix needs trainer.loss=cross_entropy (soft targets)")
    check_data(cfg.data, files=cfg.task in ("train", "evaluate"))  # predict/export read no dataset
    to_schema(cfg.finetune, FinetuneConfig, "finetune").check()
    check_optimizer(cfg.optimizer)
    check_prune_list()
    prune = to_schema(cfg.prune, PruneConfig, "prune")
    prune.check()
    ensemble = to_schema(cfg.ensemble, EnsembleConfig, "ensemble")
    ensemble.check()
    cv = to_schema(cfg.cv, CVConfig, "cv")
    cv.check(trainer)
    fuses = uses_ensemble(cfg)
    ensemble.check_run(fuses, bool(cfg.model.get("weights")), trainer, cv)  # a _target_ model may have no weights
    # With pruning, the scheduler also sizes the fine-tuning: trainer.epochs=0 prunes a loaded model.
    # An ensemble of loaded members (no ensemble.members) trains nothing with trainer.epochs=0.
    sized = prune.name == "none" and not (fuses and not ensemble.members)
    check_scheduler(cfg.scheduler, trainer.epochs if sized else 1)
    check_structured_support(cfg)
    to_schema(cfg.distill, DistillConfig, "distill").check()
    check_gates(metric_gates(cfg.gate))  # gate.baseline's own keys: check_baseline_settings
    check_baseline_settings(cfg.gate)
    for key in ("evaluate", "predict", "export", "report", "lr_find", "output", "audit"):
        to_schema(cfg[key], SCHEMAS[key], key).check()
    if cfg.compress is not None:  # null in a plain run and in compress.py's stage configs
        to_schema(cfg.compress, CompressConfig, "compress").check()
    check_task(cfg)
    check_streamed(cfg)
    check_balance(cfg)
    check_multi_label(cfg)  # trainer.loss=bce against single-label options
    if not isinstance(cfg.plots, bool):
        raise UserError(f"plots={cfg.plots!r} is invalid; use true or false")
    check_loggers(cfg.logger)
    check_checkpoint(cfg.checkpoint)


def trainer_config(node: DictConfig) -> TrainerConfig:
    """The `trainer` group as a TrainerConfig (what the engine takes, once `device` is resolved)."""
    return to_schema(node, TrainerConfig, "trainer")


@functools.cache
def _packaged() -> DictConfig:
    """The packaged default config (configs/train.yaml and its default options), composed once by Hydra."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or a test's compose context
        return compose(config_name="train")
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):
        return compose(config_name="train")


def packaged(key: str = "") -> Any:
    """The group or key `key` (dotted for a nested one, e.g. trainer.ema; "" for the whole config) as the packaged
    default options set it: a copy, for callers that build a group from its defaults plus their own values."""
    value = OmegaConf.select(_packaged(), key) if key else _packaged()
    return value.copy() if OmegaConf.is_config(value) else value


def defaults(key: str, **overrides: Any) -> Any:
    """The dataclass of group `key` (e.g. "trainer", "trainer.ema") with the packaged default option's values, and
    `overrides` on top (any Python value: the engine's `device` may be a torch.device). For code and tests that
    need a group's settings without composing a run; the values come from the YAML, never a second copy."""
    group, _, nested = key.partition(".")
    value = to_schema(packaged(group), SCHEMAS[group], group)
    for name in filter(None, nested.split(".")):
        value = getattr(value, name)
    return replace(value, **overrides)
