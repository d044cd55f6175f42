"""The checks no group dataclass owns: those of the groups without one, whose keys are the user's (a `_target_`'s
arguments, any gate, any logger: only the keys shelltrain itself reads are checked), and those that span groups;
and the value helpers the dataclasses' own checks use (at_least, one_of, to_schema, ...). shelltrain.schema.validate()
calls them; the checks of each group sit beside its fields in schema.py. This module imports no schema: the
imports point from the schemas to here only."""

from __future__ import annotations

import math
import re
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from shelltrain.errors import UserError
from shelltrain.gates import parse_key
from shelltrain.rundir import ensemble_dir
from shelltrain.schema_values import MULTI_LABEL_MONITORS, POS_WEIGHTS

LOGGERS = ("csv", "tensorboard", "jsonl", "mlflow", "wandb")
WANDB_MODES = ("online", "offline", "disabled")  # logger.wandb.mode (null: wandb's own default)
WANDB_TARGET = "shelltrain.wandb_logger.WandbLogger"
TASKS = ("train", "evaluate", "predict", "export", "lr_find", "audit")
# Model families whose structured (channel) pruning torch-pruning 1.6 cannot do.
STRUCTURED_UNSUPPORTED = ("swin", "shufflenet")


def check_optimizer(optimizer: DictConfig) -> None:
    if not optimizer.get("_target_"):
        raise UserError("optimizer._target_ is missing; pick an option, e.g. optimizer=adamw")
    lr = optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < math.inf:  # also NaN and inf
        raise UserError(
            f"optimizer.lr={lr!r} is invalid; the learning rate must be a number > 0, e.g. optimizer.lr=0.01"
        )
    decay = optimizer.get("weight_decay", 0.0)
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 <= decay < math.inf:
        raise UserError(f"optimizer.weight_decay={decay!r} is invalid; use a number >= 0, e.g. 5e-4")


def check_scheduler(scheduler: DictConfig, epochs: int) -> None:
    """`epochs`: what the schedule is sized by (0 trains nothing, which a total_steps schedule cannot size)."""
    interval = scheduler.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise UserError(f"scheduler.interval={interval!r} is invalid; choose one of epoch, step")
    if "ReduceLROnPlateau" in str(scheduler.get("_target_")) and interval != "epoch":
        raise UserError(
            "scheduler=plateau steps on the validation metric, once per epoch; set scheduler.interval=epoch"
        )
    if scheduler.get("_target_") and "total_steps" in scheduler and epochs == 0:
        raise UserError(
            "scheduler needs trainer.epochs > 0 to size its schedule; use scheduler=none with trainer.epochs=0"
        )


def check_gates(gate: DictConfig) -> None:
    """gate.<metric>_min / _max: numbers (or null), and no pair that no run can pass."""
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


def check_loggers(loggers: DictConfig | None) -> None:
    """Each entry of `logger` (null: none chosen, logger=[]) is a packaged logger or one of the user's with a
    `_target_`."""
    for name, options in (loggers or {}).items():
        if name not in LOGGERS and not (isinstance(options, DictConfig) and options.get("_target_")):
            raise UserError(
                f"logger.{name} is not a logger; choose from {', '.join(LOGGERS)} "
                "(several at once: logger=[csv,tensorboard]) or give it a _target_"
            )
        if isinstance(options, DictConfig) and options.get("_target_") == WANDB_TARGET:
            _check_wandb_mode(name, options.get("mode"))


def _check_wandb_mode(name: str, mode: Any) -> None:
    """wandb.init would refuse a bad mode only once training is built, with a traceback."""
    if mode is not None and mode not in WANDB_MODES:
        raise UserError(
            f"logger.{name}.mode={mode!r} is not a W&B mode; choose from {', '.join(WANDB_MODES)} "
            "(or null: W&B's default, WANDB_MODE or online)"
        )


def check_checkpoint(checkpoint: DictConfig) -> None:
    """checkpoint.export_state_dict is null or a file name (written into the run's checkpoints/ folder)."""
    name = checkpoint.export_state_dict
    if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
        raise UserError(
            f"checkpoint.export_state_dict={name!r} is invalid; give a file name such as model.pth, or null"
        )


def check_balance(cfg: DictConfig) -> None:
    """data.balance's remedies need what they act on: loss_weights the cross-entropy, sampler the train loader."""
    balance = cfg.data.balance
    if balance == "loss_weights" and cfg.trainer.loss != "cross_entropy":
        raise UserError(f"data.balance=loss_weights weights the cross-entropy; trainer.loss is {cfg.trainer.loss}")
    if balance == "loss_weights" and cfg.distill.name != "none":
        raise UserError(
            "data.balance=loss_weights and distill replace the same training loss; use data.balance=sampler"
        )
    if balance == "sampler" and cfg.cv.folds:
        raise UserError("data.balance=sampler does not apply to cross-validation folds; use data.balance=loss_weights")


def check_multi_label(cfg: DictConfig) -> None:
    """trainer.loss=bce (multi-label) against the options that assume one class per image, and the keys that only
    a multi-label run reads. MSE and mixup/cutmix with bce are refused where trainer.loss is checked."""
    trainer, data = cfg.trainer, cfg.data
    one_of("trainer.pos_weight", trainer.pos_weight, POS_WEIGHTS)
    columns = OmegaConf.is_list(data.label_column)
    if trainer.loss != "bce":
        for key, used in (
            (f"trainer.pos_weight={trainer.pos_weight}", trainer.pos_weight is not None),
            (f"trainer.monitor={trainer.monitor}", trainer.monitor in MULTI_LABEL_MONITORS),
            ("data.label_column=[...] (one 0/1 column per class)", columns),
        ):
            if used:
                raise UserError(f"{key} is multi-label; set trainer.loss=bce (or drop it)")
        return
    if columns and (len(data.label_column) < 2 or len(set(map(str, data.label_column))) < len(data.label_column)):
        raise UserError(f"data.label_column={list(data.label_column)}: name two or more different 0/1 class columns")
    refused = (
        ("ensemble=vote", cfg.ensemble.name == "vote", "votes count one class per model; use ensemble=average"),
        ("trainer.calibrate=temperature", trainer.calibrate != "none", "it scales a softmax; set it to none"),
        ("data.balance=sampler", data.balance == "sampler", "it draws by one class; use trainer.pos_weight=balanced"),
        (f"distill={cfg.distill.name}", cfg.distill.name != "none", "it matches softmax outputs; set distill=none"),
        ("task=audit", cfg.task == "audit", "it checks single-label data; set trainer.loss=cross_entropy"),
    )
    for key, used, why in refused:
        if used:
            raise UserError(f"{key} does not apply to multi-label training (trainer.loss=bce): {why}")


def check_task(cfg: DictConfig) -> None:
    """evaluate, predict and export use a trained model and train nothing (audit trains its own fold models)."""
    one_of("task", cfg.task, TASKS)
    if cfg.task not in ("train", "lr_find", "audit") and not cfg.model.get("weights"):
        raise UserError(f"task={cfg.task} needs the trained model: add model.weights=<run directory or checkpoint>")
    if cfg.task == "predict" and not cfg.predict.input:
        raise UserError("task=predict needs images: add predict.input=<folder of images>")


def check_streamed(cfg: DictConfig) -> None:
    """data=shards streams the train split: what needs every train label before training cannot use it."""
    if cfg.data.name != "shards":
        return
    for key, used in (("cv.folds", bool(cfg.cv.folds)), ("task=audit", cfg.task == "audit")):
        if used:
            raise UserError(
                f"{key} needs every train label up front and data=shards streams them; "
                "use data=imagefolder or data=manifest"
            )


def check_structured_support(cfg: DictConfig) -> None:
    """Architectures torch-pruning's dependency graph cannot prune structurally fail here, not after training."""
    if cfg.prune.name != "structured":
        return
    model = str(cfg.model.get("name") or cfg.model.get("_target_") or "")
    unsupported = [family for family in STRUCTURED_UNSUPPORTED if model.lower().startswith(family)]
    if unsupported:
        raise UserError(
            f"prune=structured cannot prune model {model!r}: torch-pruning does not handle {unsupported[0]} "
            "models (channel shuffles / shifted windows); use prune=magnitude or a resnet, mobilenet or efficientnet"
        )


def finite(key: str, value: float | None, fix: str) -> None:
    """`value` (None: unset, which passes) is a finite number: NaN and infinity pass every comparison-based check
    below unnoticed (nan < 0 is false), so each of them asks this first. `fix` ends the message."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}={value} is not a finite number; {fix}")


def at_least(key: str, value: float | None, minimum: float) -> None:
    """`value` (None: unset, which passes) is a finite number at least `minimum`."""
    finite(key, value, f"use a number >= {minimum}")
    if value is not None and value < minimum:
        raise UserError(f"{key}={value} is out of range; it must be >= {minimum}")


def positive(key: str, value: float, example: str) -> None:
    """`value` is a finite number > 0 (a temperature, a tolerance, a rate)."""
    finite(key, value, f"use a number > 0, e.g. {example}")
    if value <= 0:
        raise UserError(f"{key}={value} must be > 0, e.g. {example}")


def in_unit_interval(key: str, value: float, note: str = "") -> None:
    """`value` is in [0, 1] (NaN fails the comparison too)."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{key}={value} is out of range; use a value in [0, 1]{note}")


def finite_list(key: str, values: list[float] | None) -> None:
    """Every number of the list `values` (None passes) is finite."""
    if values is not None and not all(math.isfinite(v) for v in values):
        raise UserError(f"{key}={list(values)} holds a number that is not finite; give finite numbers")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """data.val_fraction and data.test_fraction: each in [0, 1), leaving train data."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"data.{key}={value} is out of range; use a fraction in [0, 1), e.g. 0.1")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves "
            "no training data; keep their sum below 1, e.g. data.val_fraction=0.1 data.test_fraction=0.2"
        )


def check_workers(value: Any) -> None:
    """data.num_workers: a count >= 0 or "auto"."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"data.num_workers={value!r} is invalid; use a count >= 0 or auto (the CPU cores, at most 8)")


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r} is invalid; choose one of {', '.join(map(str, allowed))}")


def to_schema(node: Any, schema: type, key: str) -> Any:
    """Merge a group into its dataclass and return an instance: wrong types and unknown keys fail with the full key."""
    try:
        # Resolve first: a group's interpolations (e.g. ${data.image_size}) point outside the group.
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except ValidationError as exc:
        raise UserError(wrong_type(exc, f"{key}.")) from None
    except ConfigKeyError as exc:
        allowed = ", ".join(schema.__dataclass_fields__)
        raise UserError(f"unknown key '{key}.{exc.key}'; valid keys of {key}: {allowed}") from None
    for name in _set_mandatory(values, schema):  # `???` in an option: the user must set it; a later check says how
        merged[name] = None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:  # the schema holds no values: a key no option sets (e.g. a --config-dir option of the user's)
        raise UserError(
            f"{key}.{missing[0]} has no value: the {key} option leaves it out; set it, e.g. {key}.{missing[0]}=..., "
            f"or start the option's defaults list with a packaged {key} option (`shelltrain --help` lists them)"
        )
    return OmegaConf.to_object(merged)


def _set_mandatory(values: Any, schema: type) -> list[str]:
    """The keys an option marks `???` (data.root of data=imagefolder) whose type takes null: left for the group's own
    check, which names what the key must hold (and a task that does not read it need not set it)."""
    if not isinstance(values, dict):
        return []
    fields = schema.__dataclass_fields__
    return [k for k, v in values.items() if v == "???" and k in fields and "Optional" in str(fields[k].type)]


def wrong_type(exc: ValidationError, prefix: str = "") -> str:
    """The one-line message for a value OmegaConf cannot convert to its key's type (here or while composing);
    a plain value given to a group of keys (trainer.swa=true) names the group's keys instead."""
    group = getattr(exc, "child_node", None)
    if isinstance(group, DictConfig) and not isinstance(exc.value, (dict, DictConfig)) and len(group):
        keys = [str(key) for key in group.keys()]
        return (
            f"{prefix}{exc.full_key}={exc.value!r}: {exc.full_key} is a group of keys ({', '.join(keys)}); "
            f"set one of them, e.g. {exc.full_key}.{keys[0]}=..."
        )
    return f"{prefix}{exc.full_key}={exc.value!r} has the wrong type; {exc.msg.splitlines()[0]}"


def uses_ensemble(cfg: DictConfig) -> bool:
    """Whether a run fuses members: a rule is chosen, or model.weights names an ensemble run directory."""
    return cfg.ensemble.name != "none" or ensemble_dir(cfg.model.get("weights")) is not None


PRUNE_LIST = re.compile(r"^\+{0,2}prune=\[(?P<methods>.*)\]$")


def check_prune_list() -> None:
    """`prune=[structured,quantize]` would compose into the last method alone (Hydra merges a list of options), so
    the first would silently not run: refused, naming prune.then, which chains methods."""
    overrides = [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []
    for override in overrides:
        found = PRUNE_LIST.match(override.replace(" ", ""))
        first, *rest = found["methods"].split(",") if found else [""]
        if rest:
            raise UserError(
                f"{override}: prune takes one method; give the first and chain the others with prune.then: "
                f"prune={first} prune.then=[{','.join(rest)}]"
            )
