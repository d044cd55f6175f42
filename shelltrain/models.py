"""Model construction: torchvision models by name, a small CNN, or any `_target_` the user names.

The architecture adapts to the data (classes, input channels, small inputs) with generic
surgery on the first convolution and the classifier, not with per-model code.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from shelltrain.errors import UserError
from shelltrain.explain import explain_instantiation
from shelltrain.imagesize import plain_size
from shelltrain.timm_models import build_timm

# Keys of the model group that shelltrain reads itself (transfer learning) and never passes to a `_target_`.
SHELLTRAIN_KEYS = ("weights", "strict")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head: trains in seconds on CPU."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(3):
            out = width * 2**i
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(1),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(cfg: DictConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Build the configured model for `num_classes` outputs and `in_channels` input planes."""
    if cfg.get("_target_"):
        node = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(node, dict)
        target_args = {k: v for k, v in node.items() if k not in SHELLTRAIN_KEYS}
        try:
            return instantiate(target_args, num_classes=num_classes)
        except InstantiationException as exc:  # a blocked target, one that cannot be imported, or bad arguments
            raise UserError(explain_instantiation(exc, "model")) from exc
    if cfg.library == "timm":
        model = build_timm(cfg, num_classes, in_channels)  # timm sizes the head and the stem itself
    elif cfg.name == "cnn":
        return SmallCNN(num_classes, in_channels, width=cfg.width, dropout=cfg.dropout)
    else:
        model = _torchvision_model(cfg.name, num_classes)
        if in_channels != 3:
            _adapt_input_channels(model, in_channels)
    if cfg.small_input:
        _small_input_stem(model)
    if cfg.dropout > 0:
        name, head = find_classifier(model)
        set_submodule(model, name, nn.Sequential(nn.Dropout(cfg.dropout), head))
    return model


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"model.name={name!r} is not a torchvision classification model{hint} "
            "(or set model._target_ to your own class)"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer (fc, classifier[-1], heads.head, ...): the head that maps to classes."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no Linear classifier to adapt")
    return linears[-1]


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise UserError(f"{type(model).__name__} has no Conv2d stem to adapt")


def _small_input_stem(model: nn.Module) -> None:
    """Stride-1 3x3 first convolution and no stem max-pool: keeps resolution for 32x32 inputs."""
    name, conv = _first_conv(model)
    set_submodule(model, name, _conv_like(conv, in_channels=conv.in_channels, kernel_size=3, stride=1, padding=1))
    for child_name, child in model.named_children():
        if isinstance(child, nn.MaxPool2d):
            set_submodule(model, child_name, nn.Identity())
            break


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    name, conv = _first_conv(model)
    set_submodule(model, name, _conv_like(conv, in_channels=in_channels))


def _conv_like(conv: nn.Conv2d, **changes: Any) -> nn.Conv2d:
    args = dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    args.update(changes)
    return nn.Conv2d(**args)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def first_forward(model: nn.Module, example: torch.Tensor) -> None:
    """Run one batch through the model before training: Lazy* layers get their parameters before the optimizer
    sees them, and an input the architecture cannot take (too small) is one line now, not a crash mid-step."""
    try:
        with torch.no_grad():
            model.eval()(example)
    except RuntimeError as exc:
        size = plain_size(tuple(example.shape[-2:]))
        raise UserError(
            f"data.image_size={size}: the model cannot run on {tuple(example.shape[1:])} inputs "
            f"({' '.join(str(exc).split())[:200]}); use a larger data.image_size"
        ) from exc
