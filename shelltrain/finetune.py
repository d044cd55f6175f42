"""Transfer learning's second half: what trains when.

`FinetunePolicy` (a Callback) sets `requires_grad` and the BatchNorm mode at every epoch start
(`finetune.policy`: full, linear_probe, freeze_backbone, gradual) and builds the parameter groups of
discriminative learning rates (`finetune.backbone_lr_mult`, `finetune.layer_decay`). `transfer_log` and
`transfer_summary` are what the runner shows and records of the whole transfer (weights and policy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig
from torch import nn

from shelltrain.engine import Callback
from shelltrain.errors import UserError
from shelltrain.imagesize import plain_size
from shelltrain.models import find_classifier
from shelltrain.schema_values import POLICIES
from shelltrain.timm_models import timm_layer_groups
from shelltrain.transfer import WeightsSource, describe_load, preprocessing_note

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class Unit:
    """A block of the backbone that is frozen or trained as one (resnet's layer3, a mobilenet block)."""

    name: str
    params: list[nn.Parameter]
    modules: list[nn.Module] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def backbone_units(model: nn.Module, head_name: str) -> list[Unit]:
    """The backbone split into blocks in forward order, without any per-model table: start from the model's
    children and split the largest block into its children while it holds more than half the backbone's
    parameters; a normalization layer joins the block before it (resnet: conv1+bn1, layer1, ..., layer4.0,
    layer4.1)."""
    head = model.get_submodule(head_name)
    head_ids = {id(p) for p in head.parameters()}

    def unit(name: str, module: nn.Module) -> Unit:
        params = [p for p in module.parameters() if id(p) not in head_ids]
        return Unit(name, params, [m for m in module.modules() if m is not head])

    def split(name: str, module: nn.Module) -> list[Unit]:
        prefix = f"{name}." if name else ""
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in head_ids]
        if own and not list(module.children()):
            return [Unit(name, [p for _, p in own], [module])]  # a leaf layer
        parts = [Unit(f"{prefix}{n}", [p]) for n, p in own]  # e.g. ViT's class_token: a unit of its own
        for child_name, child in module.named_children():
            if f"{prefix}{child_name}" == head_name:
                continue
            part = unit(f"{prefix}{child_name}", child)
            if part.params:
                parts.append(part)
        return parts

    units = split("", model)
    total = sum(u.numel for u in units)
    while units:
        largest = max(range(len(units)), key=lambda i: units[i].numel)
        big = units[largest]
        module = _module_or_none(model, big.name)  # None for a unit that is one parameter (ViT's class_token)
        if module is None or big.numel * 2 <= total:
            break
        parts = split(big.name, module)
        if not parts or len(parts) == 1 and parts[0].name == big.name:
            break  # a leaf layer: nothing to split
        units[largest : largest + 1] = parts
    return _merge_norms(units)


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _merge_norms(units: list[Unit]) -> list[Unit]:
    merged: list[Unit] = []
    for u in units:
        is_norm = u.modules and all(isinstance(m, _NORMS) for m in u.modules if list(m.parameters(recurse=False)))
        if is_norm and merged:
            last = merged[-1]
            merged[-1] = Unit(f"{last.name}+{u.name}", last.params + u.params, last.modules + u.modules)
        else:
            merged.append(u)
    return merged


class FinetunePolicy(Callback):
    """Freezes and unfreezes backbone blocks at epoch starts; frozen blocks keep their BatchNorm statistics."""

    def __init__(self, model: nn.Module, cfg: DictConfig, notify: Callable[[str], None] | None = None):
        self.model = model
        self.policy = cfg.policy
        if self.policy not in POLICIES:
            raise UserError(f"finetune.policy={self.policy!r} is invalid; choose one of {', '.join(POLICIES)}")
        self.unfreeze_at = int(cfg.unfreeze_at)
        self.unfreeze_every = int(cfg.unfreeze_every)
        self.backbone_lr_mult = float(cfg.backbone_lr_mult)
        self.layer_decay = float(cfg.layer_decay)
        self.freeze_bn = bool(cfg.freeze_bn)
        self.notify = notify or (lambda message: None)
        self.head_name, head = find_classifier(model)
        self.head_params = list(head.parameters())
        self.units = backbone_units(model, self.head_name)
        self.trainable_units: int | None = None
        self.events: list[dict[str, Any]] = []
        self.apply(1, announce=False)  # the first epoch's state, before the optimizer is built

    def units_training_in(self, epoch: int) -> int:
        """How many backbone blocks, counted from the head, train in `epoch` (1-based)."""
        n = len(self.units)
        if self.policy == "full":
            return n
        if self.policy == "linear_probe":
            return 0
        if epoch <= self.unfreeze_at:
            return 0
        if self.policy == "freeze_backbone":
            return n
        return min(n, 1 + (epoch - self.unfreeze_at - 1) // self.unfreeze_every)  # gradual

    def on_epoch_start(self, epoch: int, num_batches: int) -> None:
        self.apply(epoch)

    def apply(self, epoch: int, announce: bool = True) -> None:
        count = self.units_training_in(epoch)
        frozen = self.units[: len(self.units) - count]
        if count != self.trainable_units:
            for i, unit in enumerate(self.units):
                for p in unit.params:
                    p.requires_grad_(i >= len(self.units) - count)
            for p in self.head_params:
                p.requires_grad_(True)
            self.trainable_units = count
            event = {
                "epoch": epoch,
                "frozen": [u.name for u in frozen],
                "trainable": [u.name for u in self.units[len(frozen) :]] + [self.head_name],
                "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            }
            self.events.append(event)
            if announce:
                self.notify(self.describe())
        if self.freeze_bn:
            for unit in frozen:  # model.train() at every epoch start put them back in training mode
                for module in unit.modules:
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()

    def describe(self) -> str:
        event = self.events[-1]
        frozen = self.units[: len(event["frozen"])]
        return (
            f"finetune {self.policy}, epoch {event['epoch']}: {_describe(frozen, self.units)}; "
            f"{event['trainable_params']:,} trainable parameters"
        )

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Parameter groups with `lr_mult` (the head 1, the backbone `backbone_lr_mult`, times `layer_decay` per
        block below the top one); None for plain full training. A timm model's layers are timm's own (its
        `group_matcher`), scaled as timm scales them: `layer_decay` per layer below the head's. Frozen parameters are
        in the groups too: while they have no gradient the optimizer skips them (no update, no weight decay), and
        once unfrozen they train."""
        if self.policy == "full" and self.backbone_lr_mult == 1.0 and self.layer_decay == 1.0:
            return None
        timm_layers = timm_layer_groups(self.model) if self.layer_decay != 1.0 else None
        if timm_layers is not None:
            (head_name, head_params), *below = reversed(timm_layers)
            groups = [{"name": head_name, "params": head_params, "lr_mult": 1.0}]
            for depth, (name, params) in enumerate(below, start=1):
                groups.append(
                    {"name": name, "params": params, "lr_mult": self.backbone_lr_mult * self.layer_decay**depth}
                )
            return groups
        groups = [{"name": self.head_name, "params": self.head_params, "lr_mult": 1.0}]
        if self.layer_decay == 1.0:
            params = [p for u in self.units for p in u.params]
            groups.append({"name": "backbone", "params": params, "lr_mult": self.backbone_lr_mult})
        else:
            for depth, unit in enumerate(reversed(self.units)):
                mult = self.backbone_lr_mult * self.layer_decay**depth
                groups.append({"name": unit.name, "params": unit.params, "lr_mult": mult})
        return groups

    def summary(self, lr: float) -> dict[str, Any]:
        groups = self.param_groups() or [{"name": "all", "lr_mult": 1.0}]
        return {
            "policy": self.policy,
            "units": [u.name for u in self.units],
            "head": self.head_name,
            "freeze_bn": self.freeze_bn,
            "schedule": self.events,
            "trainable_params": self.events[-1]["trainable_params"] if self.events else None,
            "lr_groups": [{"name": g["name"], "lr": lr * g["lr_mult"]} for g in groups],
        }


def _describe(frozen: list[Unit], units: list[Unit]) -> str:
    if not frozen:
        return "everything trains"
    if len(frozen) == len(units):
        return "backbone frozen, the head trains"
    return f"{len(units) - len(frozen)} of {len(units)} backbone blocks train (from {units[len(frozen)].name} up)"


def make_policy(
    model: nn.Module, cfg: DictConfig | None, notify: Callable[[str], None] | None = None
) -> FinetunePolicy | None:
    """The fine-tuning policy, or None for plain training (policy full at one learning rate)."""
    if cfg is None or (cfg.policy == "full" and cfg.backbone_lr_mult == 1.0 and cfg.layer_decay == 1.0):
        return None
    return FinetunePolicy(model, cfg, notify)


def transfer_log(
    source: WeightsSource | None,
    report: dict[str, Any] | None,
    data_cfg: DictConfig,
    stats_from: str,
    policy: FinetunePolicy | None,
) -> list[str]:
    lines = describe_load(report) if report else []
    note = preprocessing_note(source, data_cfg, stats_from)
    if note:
        lines.append(note)
    if policy is not None:
        lines.append(policy.describe())
        groups = policy.param_groups()
        if groups and any(g["lr_mult"] != 1.0 for g in groups):
            mults = ", ".join(f"{g['name']} x{g['lr_mult']:.3g}" for g in groups[:6])
            lines.append(f"learning rates: optimizer.lr x {mults}{', ...' if len(groups) > 6 else ''}")
    return lines


def transfer_summary(
    model: nn.Module,
    report: dict[str, Any] | None,
    data: Any,
    stats_from: str,
    policy: FinetunePolicy | None,
    lr: float,
) -> dict[str, Any]:
    """summary.json["transfer"]: the weights' origin, what was loaded, the preprocessing, what was frozen when."""
    summary: dict[str, Any] = {"weights": None} if report is None else dict(report)
    summary["preprocessing"] = {
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": plain_size(data.image_size),
        "from": stats_from,
    }
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["finetune"] = policy.summary(lr) if policy else {"policy": "full"}
    return summary
