"""The schemas of making a trained model smaller: `prune` (pruning and quantization), `distill` (a student learning
from a teacher) and `compress` (the whole chain in one run). Types and checks only: the values and each key's
one-line meaning live in the YAML (configs/prune/none.yaml, configs/distill/none.yaml,
configs/experiment/compress_digits.yaml); schema.py registers these with the other groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from shelltrain import schema_values as values
from shelltrain.checks import at_least, in_unit_interval, one_of, positive
from shelltrain.errors import UserError


class PruneConfig:
    """The `prune` group: every method's keys (each reads its own; configs/prune/none.yaml describes them), and
    `global`, added below by name: a Python keyword cannot be a parameter of a generated __init__."""

    name: str
    schedule: str
    steps: int
    ramp: str
    max_acc_drop: float
    finetune_epochs: int
    finetune_lr_mult: float
    amount: float
    ratio: float
    importance: str
    threshold: float
    blocks: int
    mode: str
    bits: int
    backend: str
    calibration_batches: int
    latency_batch: int
    latency_threads: int
    latency_repeats: int
    distill: bool
    distill_temperature: float
    distill_alpha: float
    then: Optional[list[str]]
    modules: Optional[list[str]]
    exclude: Optional[list[str]]

    def __init__(self, **keys: Any) -> None:
        for key, value in keys.items():
            setattr(self, key, value)

    def check(self) -> None:
        self.check_numbers()
        if self.name == "none":
            return
        one_of("prune.name", self.name, tuple(values.PRUNE_SCHEDULES))
        schedules = values.PRUNE_SCHEDULES[self.name]
        if self.schedule not in schedules:
            raise UserError(
                f"prune.schedule={self.schedule!r} is not available for prune={self.name}; "
                f"choose one of {', '.join(schedules)}"
            )
        one_of("prune.importance", self.importance, values.PRUNE_IMPORTANCES)
        one_of("prune.ramp", self.ramp, values.PRUNE_RAMPS)
        one_of("prune.mode", self.mode, values.QUANTIZE_MODES)
        one_of("prune.backend", self.backend, values.QUANTIZE_BACKENDS)
        steps = [self.name, *(self.then or [])]
        for step in steps[1:]:
            one_of("prune.then", step, tuple(values.PRUNE_SCHEDULES))
        if "quantize" in steps[:-1]:
            raise UserError(f"prune.then: quantize must be the last step ({' -> '.join(steps)}); move it to the end")

    def check_numbers(self) -> None:
        """The numeric keys, checked with prune=none too: the packaged values pass, and a NaN or an out-of-range
        value is a mistake whichever method (or compress stage) reads it."""
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


PruneConfig.__annotations__["global"] = "bool"
PruneConfig = dataclass(init=False, repr=False, eq=False)(PruneConfig)


@dataclass
class DistillConfig:
    """The `distill` group: a student trained against a teacher's temperature-softened outputs (shelltrain.distill)."""

    name: str
    teacher: Optional[str]
    sweep: Optional[str]
    top_k: Optional[int]
    temperature: float
    alpha: float
    cache: Optional[bool]

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
class LatencyConfig:
    """compress.latency: how every stage's model is timed on the CPU (shelltrain.prune.measure.LatencySpec)."""

    batch: int
    threads: int
    repeats: int

    def check(self) -> None:
        for key in ("batch", "threads", "repeats"):
            at_least(f"compress.latency.{key}", getattr(self, key), 1)


@dataclass
class CompressConfig:
    """The `compress` section (null: off): teacher ensemble -> distilled student -> pruned -> int8, in one run
    (shelltrain.compress). teacher, distill, prune and quantize are overrides of the run's config for one stage:
    each stage's whole config is validated when the run starts, so only their shape is checked here."""

    teacher: dict[str, Any]
    distill: dict[str, Any]
    prune: dict[str, Any]
    quantize: dict[str, Any]
    export: str
    latency: LatencyConfig

    def check(self) -> None:
        one_of("compress.export", self.export, values.EXPORT_FORMATS)
        self.latency.check()
        for stage in ("prune", "quantize"):
            unknown = sorted(set(getattr(self, stage)) - set(PruneConfig.__dataclass_fields__))
            if unknown:
                raise UserError(
                    f"compress.{stage}.{unknown[0]} is not a prune key; give prune keys only, "
                    f"e.g. compress.{stage}.name=quantize"
                )
        unknown = sorted(set(self.distill) - set(DistillConfig.__dataclass_fields__))
        if unknown:
            raise UserError(
                f"compress.distill.{unknown[0]} is not a distill key; give distill keys only, "
                "e.g. compress.distill.temperature=2"
            )
