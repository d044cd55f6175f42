"""Where a model and its tensors live. One place decides it, so the CUDA-only rules hold on every path:
the model is on its device before an optimizer exists (restored optimizer state follows the parameters),
a quantized model runs on the CPU whatever the run's device, and only host-to-device copies from pinned
memory are asynchronous.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from shelltrain.schema import TrainerConfig


def place(model: nn.Module, settings: TrainerConfig) -> nn.Module:
    """`model` on `settings.device` in its memory format (in place; returned for chaining). Called before the
    optimizer is built, so `Optimizer.load_state_dict` puts momentum/Adam state beside the parameters."""
    model.to(torch.device(settings.device))
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(quantized_module(m) for m in model.modules())


def quantized_module(module: nn.Module) -> bool:
    """torch.ao.nn.quantized(.dynamic) and torch.ao.nn.intrinsic.quantized (fused conv-relu, ...) modules."""
    path = type(module).__module__
    return path.startswith("torch.ao.nn.") and ".quantized" in path


def eval_settings(model: nn.Module, settings: TrainerConfig) -> TrainerConfig:
    """Where `model` is evaluated: quantized kernels run on the CPU only, in float32 around them; any other
    model on the run's device. Every evaluation (engine.predict) goes through here."""
    if is_quantized(model):
        return replace(settings, device=torch.device("cpu"), precision="32")
    return settings


def place_frozen(model: nn.Module, settings: TrainerConfig) -> nn.Module:
    """A frozen model (a distillation teacher) that is called with batches on the training device: placed where
    `eval_settings` puts it; an int8 model stays on the CPU behind `Relocated`, which moves each batch there and
    the outputs back."""
    where = eval_settings(model, settings)
    place(model, where)
    if torch.device(where.device) == torch.device(settings.device):
        return model
    return Relocated(model, torch.device(where.device))


class Relocated(nn.Module):
    """`model` kept on `device`, called from anywhere: inputs go to it, outputs come back to the caller's device."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).to(x.device)


def asynchronous(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether copying `tensor` to `device` may be non_blocking: only a host-to-device copy from pinned memory.
    A device-to-host copy returns before the data has arrived, so the host could read it too early."""
    return tensor.device.type == "cpu" and device.type != "cpu" and tensor.is_pinned()


def copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, asynchronously only where that is safe."""
    return tensor.to(device, non_blocking=asynchronous(tensor, device))


def batch_to_device(
    images: torch.Tensor, targets: torch.Tensor, settings: TrainerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch where the model runs, in its memory format."""
    device = torch.device(settings.device)
    images = copy_to(images, device)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, copy_to(targets, device)
