"""Structured-config schemas and value checks, run before any data is loaded.

Types come from the dataclasses (OmegaConf converts "5" to 5 and rejects "abc" for an int);
ranges and cross-field rules are checked by hand so each failure names its key and the fix.
Groups that are just a `_target_` (optimizer, scheduler, a user's own model) are free-form:
only the keys shelltrain itself reads are checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from shelltrain.errors import UserError


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


@dataclass
class DataSchema:
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    image_size: int = 32
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


@dataclass
class ModelSchema:
    name: str = "resnet18"
    small_input: bool = False
    dropout: float = 0.0
    width: Optional[int] = None


@dataclass
class AugmentationSchema:
    name: str = "none"
    train: list[Any] = field(default_factory=list)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


PRECISIONS = ("32", "bf16", "16-mixed")
LOSSES = ("cross_entropy", "mse")
MONITORS = ("val_acc", "val_loss")
DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "synthetic")


def validate(cfg: DictConfig) -> None:
    """Raise UserError with one line for the first bad value in the composed config."""
    trainer = _typed(cfg.trainer, TrainerSchema, "trainer")
    data = _typed(cfg.data, DataSchema, "data")
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

    _one_of("data.name", data.name, DATASETS)
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
    if (data.mean is None) != (data.std is None) or (
        data.mean is not None and len(data.mean) != len(data.std or [])
    ):
        raise UserError("data.mean and data.std must both be null or lists of the same length")
    if data.std is not None and any(s <= 0 for s in data.std):
        raise UserError(f"data.std={list(data.std)} must be positive")
    if data.limit_samples is not None:
        _at_least("data.limit_samples", data.limit_samples, 1)

    for key in ("mixup_alpha", "cutmix_alpha"):
        _at_least(f"augmentation.{key}", getattr(augmentation, key), 0.0)
    if (augmentation.mixup_alpha or augmentation.cutmix_alpha) and trainer.loss != "cross_entropy":
        raise UserError("augmentation mixup/cutmix needs trainer.loss=cross_entropy (soft targets)")

    _check_optimizer(cfg.optimizer)
    _check_scheduler(cfg.scheduler, trainer.epochs)


def _check_optimizer(optimizer: DictConfig) -> None:
    if not optimizer.get("_target_"):
        raise UserError("optimizer._target_ is missing; pick an option, e.g. optimizer=adamw")
    lr = optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise UserError(f"optimizer.lr={lr!r} is invalid; the learning rate must be a number > 0, e.g. optimizer.lr=0.01")
    decay = optimizer.get("weight_decay", 0.0)
    if not isinstance(decay, (int, float)) or decay < 0:
        raise UserError(f"optimizer.weight_decay={decay!r} is invalid; use a number >= 0, e.g. 5e-4")


def _check_scheduler(scheduler: DictConfig, epochs: int) -> None:
    interval = scheduler.get("interval", "epoch")
    _one_of("scheduler.interval", interval, ("epoch", "step"))
    if scheduler.get("_target_") and "total_steps" in scheduler and epochs == 0:
        raise UserError(
            "scheduler needs trainer.epochs > 0 to size its schedule; use scheduler=none with trainer.epochs=0"
        )


def _typed(node: DictConfig, schema: type, key: str) -> Any:
    """Merge a group into its schema: wrong types and unknown keys fail here with the full key."""
    try:
        # Resolve first: a group's interpolations (e.g. ${data.image_size}) point outside the group.
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=True))
    except ValidationError as exc:
        raise UserError(
            f"{key}.{exc.full_key}={exc.value!r} has the wrong type; {exc.msg.splitlines()[0]}"
        ) from None
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
