"""A model whose forward raises on rank 1 a few steps into training: a crash on one rank of a DDP run must end
every rank (tests/test_scale.py). Built through `+model._target_`, with the cnn config's keys."""

from __future__ import annotations

import os
from typing import Any

import torch

from shelltrain.models import SmallCNN


class CrashOnRankOne(SmallCNN):
    def __init__(self, num_classes: int, width: int = 8, **ignored: Any):
        super().__init__(num_classes, in_channels=1, width=width)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == 3 and os.environ.get("RANK") == "1":
                raise RuntimeError("planted crash on rank 1")
        return super().forward(x)
