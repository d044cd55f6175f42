"""The schemas of the task groups (evaluate, predict, export, lr_find) and of report: what a trained model is used
with. Types and checks only: the values and each key's meaning live in configs/train.yaml (schema.py says why);
schema.py registers them with the others; torch-free like it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from shelltrain import schema_values as values
from shelltrain.checks import at_least, finite, one_of, positive
from shelltrain.errors import UserError


@dataclass
class EvaluateConfig:
    split: str
    tta: str

    def check(self) -> None:
        one_of("evaluate.split", self.split, values.SPLITS)
        one_of("evaluate.tta", self.tta, values.TTA_MODES)


@dataclass
class PredictConfig:
    input: Optional[str]
    batch_size: int
    cam: bool
    cam_layer: Optional[str]

    def check(self) -> None:
        at_least("predict.batch_size", self.batch_size, 1)


@dataclass
class ExportConfig:
    format: str
    tolerance: float

    def check(self) -> None:
        one_of("export.format", self.format, values.EXPORT_FORMATS)
        positive("export.tolerance", self.tolerance, "1e-4")


@dataclass
class ReportConfig:
    per_job: str
    model_card: bool
    html: bool
    cam: bool
    cam_layer: Optional[str]

    def check(self) -> None:
        one_of("report.per_job", self.per_job, ("table", "line"))


@dataclass
class LrFindConfig:
    """task=lr_find: the exponential learning-rate ramp (shelltrain.lr_find)."""

    start_lr: float
    end_lr: float
    steps: int
    diverge: float
    smoothing: float

    def check(self) -> None:
        """A ramp that can run: finite bounds > 0 that grow (an infinite end makes every rate after the start
        infinite; a reversed range has no slope to read)."""
        positive("lr_find.start_lr", self.start_lr, "1e-6")
        positive("lr_find.end_lr", self.end_lr, "10")
        if self.start_lr >= self.end_lr:
            raise UserError(
                f"lr_find.end_lr={self.end_lr} is not above lr_find.start_lr={self.start_lr}: the ramp grows from "
                "start_lr to end_lr; set lr_find.end_lr higher, e.g. lr_find.start_lr=1e-6 lr_find.end_lr=10"
            )
        at_least("lr_find.steps", self.steps, 10)
        finite("lr_find.diverge", self.diverge, "use a number > 1, e.g. lr_find.diverge=4")
        if self.diverge <= 1:
            raise UserError(f"lr_find.diverge={self.diverge} must be > 1, e.g. 4")
        if not 0 < self.smoothing <= 1:
            raise UserError(f"lr_find.smoothing={self.smoothing} is out of range; use a value in (0, 1], e.g. 0.05")


@dataclass
class AuditConfig:
    """task=audit: the data-health report (shelltrain.audit)."""

    hash_distance: int
    pixel_tolerance: float
    outlier_factor: float
    folds: int
    rank_by: str
    gallery: int

    def check(self) -> None:
        at_least("audit.hash_distance", self.hash_distance, 0)
        if not 0 <= self.pixel_tolerance <= 1:
            raise UserError(f"audit.pixel_tolerance={self.pixel_tolerance} is out of range; use a value in [0, 1]")
        finite("audit.outlier_factor", self.outlier_factor, "use a number > 1, e.g. audit.outlier_factor=4")
        if self.outlier_factor <= 1:
            raise UserError(f"audit.outlier_factor={self.outlier_factor} must be > 1, e.g. 4")
        if self.folds == 1 or self.folds < 0:
            raise UserError(f"audit.folds={self.folds}: 0 (no label-error search) or at least 2 models, e.g. 5")
        one_of("audit.rank_by", self.rank_by, values.AUDIT_RANKS)
        at_least("audit.gallery", self.gallery, 0)
