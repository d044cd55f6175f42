"""A model that checks, at the first evaluation forward after training, that all ranks of a DDP run hold the same weights; it raises
when they have drifted apart (tests/e2e/test_ddp_cuda_paths.py: gradual unfreezing under DDP). Built through
`+model._target_`, with the cnn config's keys."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from shelltrain.models import SmallCNN


class RankChecked(SmallCNN):
    def __init__(self, num_classes: int, width: int = 8, **ignored: Any):
        super().__init__(num_classes, in_channels=1, width=width)
        self.trained = False  # since the last check: validation checks once, rank 0's final test not at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.trained = True
        elif self.trained and dist.is_available() and dist.is_initialized():
            self.trained = False
            weights = torch.cat([p.detach().flatten().double() for p in self.parameters()])
            low, high = weights.clone(), weights.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            drift = (high - low).abs().max().item()
            if drift > 1e-6:
                raise RuntimeError(f"ranks hold different weights (largest difference {drift:.3g})")
        return super().forward(x)
