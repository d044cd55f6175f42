"""The schemas of the task groups (evaluate, predict, export) and of report: what a trained model is used with.
schema.py registers them with the others; torch-free like it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from shelltrain import schema_values as values
from shelltrain.checks import at_least, one_of
from shelltrain.errors import UserError


@dataclass
class EvaluateConfig:
    split: str = "test"
    tta: str = "none"

    def check(self) -> None:
        one_of("evaluate.split", self.split, values.SPLITS)
        one_of("evaluate.tta", self.tta, values.TTA_MODES)


@dataclass
class PredictConfig:
    input: Optional[str] = None
    batch_size: int = 64

    def check(self) -> None:
        at_least("predict.batch_size", self.batch_size, 1)


@dataclass
class ExportConfig:
    format: str = "onnx"
    tolerance: float = 1e-4

    def check(self) -> None:
        one_of("export.format", self.format, values.EXPORT_FORMATS)
        if self.tolerance <= 0:
            raise UserError(f"export.tolerance={self.tolerance} must be > 0, e.g. 1e-4")


@dataclass
class ReportConfig:
    per_job: str = "table"  # what each job prints at its end: its summary table, or one line (long sweeps)

    def check(self) -> None:
        one_of("report.per_job", self.per_job, ("table", "line"))
