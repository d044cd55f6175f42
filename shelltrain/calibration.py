"""Temperature scaling (Guo et al., 2017; trainer.calibrate=temperature): after training, one temperature T > 0 is
fitted on the validation split's logits (the whole split, also under DDP) by minimising their NLL (LBFGS on log T,
so T stays positive), and the logits are divided by T from then on. Argmax is unchanged, so accuracy is too; only
the confidence moves.

T is stored in the run's checkpoints (best.pt and last.pt, key `temperature`); `trained.open_trained` wraps
the model in `Tempered`, so evaluate, predict, export and ensemble members (each with its own T) use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shelltrain.checkpoint import add_to_run_checkpoints
from shelltrain.data import DataBundle, unsharded
from shelltrain.engine import predict
from shelltrain.metrics import expected_calibration_error, nll
from shelltrain.schema import TrainerConfig


class Tempered(nn.Module):
    """A model whose logits are divided by a fitted temperature; a buffer, so that ensembles that stack their
    members' state (fusion.StackedMembers) stack each member's own temperature."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def with_temperature(model: nn.Module, temperature: float | None) -> nn.Module:
    """`model` itself without a temperature (a checkpoint of an uncalibrated run), else wrapped in Tempered."""
    return model if temperature is None else Tempered(model, temperature)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T minimising the NLL of softmax(logits / T) over the given logits."""
    logits = logits.detach().float()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


def calibrate(
    mode: str,
    model: nn.Module,
    data: DataBundle,
    settings: TrainerConfig,
    run_dir: Path,
    tested: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    """summary.json's `calibration` section ({} when trainer.calibrate=none): T fitted on the val split and stored in
    the run's checkpoints, with ECE and NLL on val and test before and after dividing the logits by T. `tested`:
    the test split's (logits, targets), as the run's test computed them."""
    if mode == "none":
        return {}
    val = unsharded(data.val)  # under DDP rank 0 fits on the whole val split, as one process does
    val_logits, val_targets = predict(model, val, settings, limit=settings.limit_val_batches)
    temperature = fit_temperature(val_logits, val_targets)
    test_logits, test_targets = tested
    add_to_run_checkpoints(run_dir, temperature=temperature)
    section: dict[str, Any] = {"method": mode, "temperature": temperature, "fitted_on": "val"}
    for split, logits, targets in (("val", val_logits, val_targets), ("test", test_logits, test_targets)):
        for when, scaled in (("before", logits), ("after", logits / temperature)):
            section[f"{split}_ece_{when}"] = expected_calibration_error(scaled, targets)
            section[f"{split}_nll_{when}"] = nll(scaled, targets)
    return {"calibration": section}


def describe_calibration(section: dict[str, Any]) -> str:
    """summary.json's calibration section in one line: T, and ECE and NLL before -> after on val and test."""
    changes = [
        f"{split} ECE {section[f'{split}_ece_before']:.4f} -> {section[f'{split}_ece_after']:.4f}, "
        f"NLL {section[f'{split}_nll_before']:.4f} -> {section[f'{split}_nll_after']:.4f}"
        for split in ("val", "test")
    ]
    fitted = f"trainer.calibrate={section['method']}: T={section['temperature']:.4g} (fitted on val)"
    return f"{fitted}; {'; '.join(changes)}"
