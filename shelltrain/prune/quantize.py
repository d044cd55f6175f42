"""Post-training quantization: the one place that touches `torch.ao.quantization`.

`torch.ao.quantization` is deprecated (its warnings point at torchao), but on torch 2.x it is still the
only path that gives real int8 speed-ups for convolutions on a CPU: torchao rejects Conv2d today. Every
call into it goes through this module, inside `silence.quiet()`, so users see none of its deprecation noise
and a later migration touches one file.

Three modes:
- `static`: eager post-training int8 for architectures torchvision ships a quantizable twin of (resnet,
  mobilenet_v2/v3_large, ...): fuse conv-bn-relu, observe activations on calibration batches, convert.
- `dynamic`: int8 weights for every Linear layer, activations quantized on the fly; works on any model
  but only speeds up the Linear layers.
- `fake`: round every conv/linear weight to `bits` bits (symmetric, per output channel) and keep float
  storage: shows what k-bit weights cost in accuracy, on any model, with no speed or size change.

Quantized kernels run on the CPU only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from shelltrain.errors import UserError
from shelltrain.placement import quantized_module
from shelltrain.silence import quiet


def static_available(arch: str | None) -> bool:
    """Whether torchvision ships a quantizable version of `arch` (eager static PTQ works for it)."""
    if not arch:
        return False
    import torchvision.models.quantization as tvq

    return arch in tvq.__dict__ and callable(tvq.__dict__[arch]) and not arch.startswith("_")


def resolve_mode(mode: str, bits: int, arch: str | None) -> str:
    if mode != "auto":
        return mode
    if bits < 8:
        return "fake"
    return "static" if static_available(arch) else "dynamic"


def quantize_mode(cfg: DictConfig, arch: str | None) -> str:
    mode = resolve_mode(cfg.mode, cfg.bits, arch)
    if mode == "static" and not static_available(arch):
        raise UserError(
            "prune.mode=static needs a model torchvision ships a quantizable version of (resnet18, resnet50, "
            f"mobilenet_v2, mobilenet_v3_large, ...), not {arch or 'a custom model'}; "
            "use prune.mode=dynamic or fake"
        )
    if mode in ("static", "dynamic") and cfg.bits != 8:
        raise UserError(f"prune.mode={mode} is int8 only; for prune.bits={cfg.bits} use prune.mode=fake")
    return mode


def static_int8(
    model: nn.Module, arch: str, calibration: Iterable[torch.Tensor] | None, backend: str = "x86"
) -> nn.Module:
    """Eager static int8 of a float `model` via torchvision's quantizable `arch`; returns a new CPU model.

    The quantizable twin takes over the float model's exact architecture first (changed stem, input
    channels, pruned widths, removed blocks, dropout head), then its weights. With `calibration=None`
    the result has placeholder scales: only good for `load_state_dict` of a saved quantized model.
    """
    import torchvision.models.quantization as tvq

    float_model = copy.deepcopy(model).cpu().eval()
    num_classes = _out_features(float_model)
    with quiet():
        twin = tvq.__dict__[arch](weights=None, quantize=False, num_classes=num_classes)
        _adopt_architecture(float_model, twin)
        twin.load_state_dict(float_model.state_dict())
        twin.eval()
        _set_engine(backend)
        twin.fuse_model()
        twin.qconfig = torch.ao.quantization.get_default_qconfig(backend)
        torch.ao.quantization.prepare(twin, inplace=True)
        with torch.inference_mode():
            for images in calibration or []:
                twin(images.cpu().float())
        torch.ao.quantization.convert(twin, inplace=True)
    return twin


def dynamic_int8(model: nn.Module, layers: list[str] | None = None) -> nn.Module:
    """int8 weights for every Linear layer, or those of `layers` (names; activations quantized per batch);
    returns a new CPU model."""
    spec = {nn.Linear} if layers is None else set(layers)
    with quiet():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), spec, dtype=torch.qint8)


@torch.no_grad()
def fake_quantize_(model: nn.Module, bits: int, layers: list[str] | None = None) -> None:
    """Round every conv/linear weight (or those of `layers`) in place to `bits` bits: symmetric, one scale per
    output channel."""
    levels = 2 ** (bits - 1) - 1
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and (layers is None or name in layers):
            w = module.weight
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / levels
            shape = (-1,) + (1,) * (w.ndim - 1)
            w.copy_((w / scale.view(shape)).round().clamp(-levels, levels) * scale.view(shape))


def rebuild(model: nn.Module, op: dict[str, Any]) -> nn.Module:
    """The quantized architecture a saved `op` describes (mode, arch, backend), ready for `load_state_dict`."""
    if op["mode"] == "static":
        return static_int8(model, op["arch"], None, op["backend"])
    if op["mode"] == "dynamic":
        return dynamic_int8(model, op.get("layers"))
    return model  # fake quantization keeps float weights: nothing to rebuild


def quantized_weight(module: nn.Module) -> torch.Tensor | None:
    """The dequantized weight of a quantized conv/linear module, or None for any other module."""
    if not quantized_module(module):
        return None
    weight = getattr(module, "weight", None)
    if not callable(weight):
        return None
    with quiet():
        w = weight()
    return w.dequantize() if w.is_quantized else w


def quantized_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if not (quantized_module(module) and callable(bias)):
        return None
    with quiet():
        return bias()


def _set_engine(backend: str) -> None:
    supported = torch.backends.quantized.supported_engines
    if backend not in supported:
        raise UserError(
            f"prune.backend={backend!r} is not supported by this torch build; supported: {', '.join(supported)}"
        )
    torch.backends.quantized.engine = backend


def _out_features(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


def _adopt_architecture(source: nn.Module, twin: nn.Module) -> None:
    """Make `twin` (a quantizable torchvision model) structurally equal to `source` (its float original).

    Containers of a compatible type are matched child by child; any other child that differs (a
    changed stem, pruned widths, a block replaced by Identity, a dropout head) is copied from `source`.
    """
    for name, child in source.named_children():
        other = getattr(twin, name, None)
        has_children = next(child.children(), None) is not None
        if other is not None and isinstance(other, type(child)) and has_children:
            _adopt_architecture(child, other)
        elif other is None or type(other) is not type(child) or repr(other) != repr(child):
            setattr(twin, name, copy.deepcopy(child))
