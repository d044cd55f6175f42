"""Transfer learning: where pretrained weights come from, how they fit the model, and what trains when.

Three steps, each a plain function the runner calls in order:

1. `open_weights(cfg.model)` reads `model.weights` (torchvision weights by enum name, a shelltrain run
   directory or checkpoint, a plain state dict, a .safetensors file) into a `WeightsSource`, which
   also knows the preprocessing the weights were trained with (`follow_weights` hands it to the data stage).
2. `load_weights(model, source, ...)` copies the tensors into the freshly built model: head surgery
   (the classifier is not loaded when the classes differ), a first convolution summed over its input
   channels for grey images, wrapper prefixes stripped; missing, unexpected and mismatched keys are
   reported (and are errors under `model.strict`).
3. `FinetunePolicy` (a Callback) sets `requires_grad` and the BatchNorm mode at every epoch start
   (`finetune.policy`: full, linear_probe, freeze_backbone, gradual) and builds the parameter
   groups of discriminative learning rates (`finetune.backbone_lr_mult`, `finetune.layer_decay`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from shelltrain.checkpoint import safe_load
from shelltrain.engine import Callback
from shelltrain.errors import UserError
from shelltrain.models import find_classifier

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")

# A checkpoint whose architecture differs from a freshly built model says so under one of these keys.
# The named module's `rebuild(model, checkpoint, example_inputs) -> nn.Module` returns a model of the
# checkpoint's architecture; its state dict is then loaded as usual (head surgery included).
REBUILDERS = {"pruning": ("shelltrain.prune", "pruning"), "ensemble": ("shelltrain.ensemble", "ensembling")}

POLICIES = ("full", "linear_probe", "freeze_backbone", "gradual")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


# ---------------------------------------------------------------------------------------------------------------
# 1. Opening the weights


@dataclass
class WeightsSource:
    """Pretrained weights, read but not yet loaded into a model."""

    spec: str  # model.weights as the user wrote it
    kind: str  # torchvision | shelltrain | state_dict | safetensors
    origin: str  # what was read, for people: an enum name and file, or a path
    state_dict: dict[str, torch.Tensor] | None = None  # None for torchvision weights until load_weights
    classes: list[str] | None = None  # the source's class names, when it has them
    preprocessing: dict[str, Any] | None = None  # mean, std, image_size the weights were trained with
    checkpoint: dict[str, Any] | None = None  # the whole payload of a checkpoint file
    enum: Any = None  # the torchvision WeightsEnum member
    model_name: str | None = None  # the model the source was trained as (a shelltrain run's model.name)


def open_weights(model_cfg: DictConfig) -> WeightsSource | None:
    """Read `model.weights`; None when it is null (random initialisation)."""
    spec = model_cfg.get("weights")
    if spec is None or str(spec).strip() == "":
        return None
    spec = str(spec)
    path = _as_path(spec)
    if path.exists():
        return _open_path(spec, path)
    if "/" in spec or os.sep in spec or spec.lower().endswith(CHECKPOINT_SUFFIXES) or spec.startswith("~"):
        raise UserError(
            f"model.weights: '{path}' does not exist; give a shelltrain run directory, a .pt/.pth/.safetensors "
            "file, or a torchvision weights name such as DEFAULT"
        )
    return _open_torchvision(spec, model_cfg)


def _as_path(spec: str) -> Path:
    from hydra.utils import to_absolute_path

    try:
        return Path(to_absolute_path(os.path.expanduser(spec)))
    except ValueError:  # outside a Hydra run: relative to the working directory
        return Path(os.path.expanduser(spec)).absolute()


def _open_path(spec: str, path: Path) -> WeightsSource:
    if path.is_dir():
        for candidate in ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise UserError(
                f"model.weights: '{path}' is a directory without checkpoints/best.pt or checkpoints/last.pt; "
                "point it at a shelltrain run directory or at a checkpoint file"
            )
    if path.suffix == ".safetensors":
        return WeightsSource(spec, "safetensors", str(path), state_dict=_read_safetensors(path))
    payload = _torch_load(path)
    if isinstance(payload.get("model"), dict) or any(key in payload for key in REBUILDERS):
        return checkpoint_source(spec, path, payload)
    state = payload.get("state_dict") if isinstance(payload.get("state_dict"), dict) else payload
    return WeightsSource(spec, "state_dict", str(path), state_dict=_tensors_only(state, path))


def _torch_load(path: Path) -> dict[str, Any]:
    payload = safe_load(path, f"model.weights: '{path}'")
    if not isinstance(payload, dict):
        raise UserError(f"model.weights: '{path}' holds a {type(payload).__name__}, not a state dict or checkpoint")
    return payload


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"model.weights: '{path}' is not a readable .safetensors file ({exc})") from None


def _tensors_only(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(
            f"model.weights: '{path}' holds no tensors (looked for a 'model' or 'state_dict' entry, "
            "or a dict of tensors)"
        )
    return tensors


def checkpoint_source(spec: str, path: Path, payload: dict[str, Any]) -> WeightsSource:
    """A shelltrain checkpoint already read from `path`, as weights to load."""
    return WeightsSource(spec, "shelltrain", str(path), checkpoint=payload, **_from_checkpoint(payload, path))


def _from_checkpoint(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """A shelltrain checkpoint: its state dict, classes, preprocessing and model name."""
    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    preprocessing = payload.get("preprocessing")
    if preprocessing is None and config.get("data", {}).get("mean") is not None:  # older checkpoints
        data = config["data"]
        preprocessing = {"mean": data["mean"], "std": data["std"], "image_size": data.get("image_size")}
    classes = payload.get("classes")
    model = config.get("model", {})
    return {
        "state_dict": _tensors_only(payload["model"], path) if isinstance(payload.get("model"), dict) else None,
        "classes": [str(c) for c in classes] if isinstance(classes, list) else None,
        "preprocessing": preprocessing,
        "model_name": model.get("name") or model.get("_target_"),
    }


def _open_torchvision(spec: str, model_cfg: DictConfig) -> WeightsSource:
    import torchvision

    name = model_cfg.get("name")
    if model_cfg.get("_target_") or name not in torchvision.models.list_models(module=torchvision.models):
        model = name or model_cfg.get("_target_")
        raise UserError(
            f"model.weights={spec}: named weights come from torchvision, and model {model!r} is not a torchvision "
            "model; give a checkpoint path (a shelltrain run directory, .pt/.pth or .safetensors)"
        )
    enum_cls = torchvision.models.get_model_weights(name)
    member = spec.split(".")[-1]  # accept ResNet18_Weights.IMAGENET1K_V1 as well as IMAGENET1K_V1
    if "." in spec and spec.split(".")[0] != enum_cls.__name__:
        raise UserError(f"model.weights={spec}: those are not weights of {name} (its weights are {enum_cls.__name__})")
    try:
        enum = enum_cls[member]
    except KeyError:
        available = ", ".join(enum_cls.__members__)
        raise UserError(f"model.weights={spec}: {name} has no such weights; choose one of {available}") from None
    transforms = enum.transforms()
    preprocessing = (
        {
            "mean": [float(v) for v in transforms.mean],
            "std": [float(v) for v in transforms.std],
            "image_size": int(transforms.crop_size[0]),
        }
        if hasattr(transforms, "mean")
        else None
    )
    categories = list(enum.meta.get("categories") or []) or None
    origin = f"torchvision {enum_cls.__name__}.{enum.name}"
    return WeightsSource(spec, "torchvision", origin, None, categories, preprocessing, enum=enum, model_name=name)


def _torchvision_state_dict(source: WeightsSource) -> dict[str, torch.Tensor]:
    """Build the model the weights belong to with torchvision's own builder (its cache under TORCH_HOME, its
    download, its key fix-ups) and take its state dict."""
    import torchvision

    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(source.enum.url)
    try:
        pretrained = torchvision.models.get_model(source.model_name, weights=source.enum)
    except Exception as exc:  # no network (URLError), a corrupt cache file, a planted file of the wrong model
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(
            f"model.weights={source.spec}: cannot load {source.origin} ({reason}); "
            f"without network, put the file at {file} (TORCH_HOME sets the folder)"
        ) from None
    source.origin = f"{source.origin} ({file})"
    return pretrained.state_dict()


# ---------------------------------------------------------------------------------------------------------------
# 2. Preprocessing follows the weights


def follow_weights(
    data_cfg: DictConfig, source: WeightsSource | None
) -> tuple[DictConfig, tuple[list[float], list[float]] | None, str]:
    """The data config to build, the mean/std to use where `data.mean` is null, and where they come from.

    Values the data config sets win; null ones follow the weights (`data.mean`/`data.std`: their normalization,
    `data.image_size`: their input size)."""
    weights = (source.preprocessing or {}) if source else {}
    if data_cfg.image_size is None:
        if not weights.get("image_size"):
            raise UserError(
                "data.image_size=null takes the input size from model.weights, and these weights do not give one; "
                "set data.image_size, e.g. data.image_size=32"
            )
        data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
        data_cfg.image_size = int(weights["image_size"])
    if data_cfg.mean is not None and data_cfg.std is not None:
        return data_cfg, None, "data config"
    if weights.get("mean") and weights.get("std"):
        return data_cfg, (list(weights["mean"]), list(weights["std"])), "weights"
    return data_cfg, None, "measured"


def preprocessing_note(source: WeightsSource | None, data_cfg: DictConfig, stats_from: str) -> str | None:
    """One line for the log when the weights' preprocessing was not (all) taken, saying how to take it."""
    weights = (source.preprocessing or {}) if source else {}
    if not weights:
        return None
    differ = []
    if stats_from != "weights" and weights.get("mean") and not _same(data_cfg, weights):
        differ.append("data.mean=null data.std=null")
    if weights.get("image_size") and data_cfg.image_size != weights["image_size"]:
        differ.append(f"data.image_size=null (={weights['image_size']})")
    if not differ:
        return f"preprocessing follows the weights: mean {weights['mean']}, std {weights['std']}"
    return "preprocessing from the data config; to follow the weights set " + " ".join(differ)


def _same(data_cfg: DictConfig, weights: dict[str, Any]) -> bool:
    """Whether the data config's mean/std are the weights' own (e.g. a run fine-tuned from a run on the same data)."""
    if data_cfg.mean is None or data_cfg.std is None:
        return False
    ours = [float(v) for v in [*data_cfg.mean, *data_cfg.std]]
    theirs = [float(v) for v in [*weights["mean"], *weights["std"]]]
    return len(ours) == len(theirs) and all(abs(a - b) < 1e-6 for a, b in zip(ours, theirs))


# ---------------------------------------------------------------------------------------------------------------
# 3. Loading into the model


def load_weights(
    model: nn.Module,
    source: WeightsSource | None,
    *,
    strict: bool = False,
    classes: list[str] | None = None,
    example_inputs: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """Copy the source's tensors into `model`; returns the model (rebuilt when the checkpoint's architecture
    differs, e.g. a pruned one) and a report of what was loaded, replaced, adapted, missing and unexpected."""
    if source is None:
        return model, None
    if source.checkpoint is not None:
        model = rebuild_architecture(model, source, example_inputs)
    if source.kind == "torchvision" and source.state_dict is None:
        source.state_dict = _torchvision_state_dict(source)
    assert source.state_dict is not None
    report = transfer_state(model, source.state_dict, source_classes=source.classes, target_classes=classes)
    report = {"weights": source.spec, "kind": source.kind, "origin": source.origin, **report}
    problems = report["missing"] + report["unexpected"] + report["mismatched"]
    if not report["loaded"]:
        trained_as = f" (it was trained as model {source.model_name!r})" if source.model_name else ""
        raise UserError(
            f"model.weights: no tensor of {source.origin} fits this model{trained_as}; pick the model and options "
            f"the weights were trained with. First keys: {', '.join(list(source.state_dict)[:3])}"
        )
    if strict and problems:
        raise UserError(
            f"model.strict=true: {source.origin} does not fit exactly: {len(report['missing'])} missing, "
            f"{len(report['unexpected'])} unexpected, {len(report['mismatched'])} mismatched "
            f"(first: {problems[0]}); set model.strict=false to load what fits"
        )
    return model, report


def rebuild_architecture(
    model: nn.Module, source: WeightsSource, example_inputs: torch.Tensor | None = None
) -> nn.Module:
    """`model` turned into the architecture a checkpoint records (pruned, quantized), by its REBUILDERS."""
    checkpoint = source.checkpoint or {}
    for key, (module_name, feature) in REBUILDERS.items():
        if key not in checkpoint:
            continue
        try:
            rebuild = importlib.import_module(module_name).rebuild
        except (ImportError, AttributeError):
            raise UserError(
                f"model.weights: '{source.origin}' is a checkpoint with '{key}' and needs shelltrain's {feature} "
                "support to rebuild its architecture; this shelltrain has none"
            ) from None
        model = rebuild(model, checkpoint, example_inputs)
        if source.state_dict is None and isinstance(checkpoint.get("model"), dict):
            source.state_dict = _tensors_only(checkpoint["model"], Path(source.origin))
    if source.state_dict is None:
        raise UserError(f"model.weights: '{source.origin}' holds no single model's state dict")
    return model


def transfer_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source_classes: list[str] | None = None,
    target_classes: list[str] | None = None,
) -> dict[str, Any]:
    """Load what fits of `state` into `model` (never strictly) and say what happened."""
    target = model.state_dict()
    state, stripped = _strip_prefix(state, target)
    head_name, head = _classifier_or_none(model)
    head_keys = {f"{head_name}.{n}" for n, _ in head.named_parameters()} if head is not None else set()
    state, head_alias = _alias_head(state, target, head_name, head_keys) if head is not None else (state, None)
    source_head = state.get(f"{head_name}.weight") if head is not None else None
    reason = None
    if source_head is not None and tuple(source_head.shape) != tuple(target[f"{head_name}.weight"].shape):
        reason = "another shape"
    elif source_head is not None and source_classes and target_classes and list(source_classes) != list(target_classes):
        reason = "other classes"
    conv_key = _first_conv_key(model)
    loadable: dict[str, torch.Tensor] = {}
    mismatched, adapted = [], []
    for key, value in state.items():
        if key not in target or (reason and key in head_keys):
            continue
        want = target[key]
        if value.shape != want.shape and key == conv_key and _channels_only(value, want):
            value = _adapt_channels(value, want.shape[1])
            how = "summed over" if want.shape[1] == 1 else "repeated to"
            adapted.append(f"{key}: {how} {want.shape[1]} input channel(s) from {state[key].shape[1]}")
        if value.shape != want.shape:
            mismatched.append(f"{key}: {tuple(value.shape)} in the weights, {tuple(want.shape)} in the model")
            continue
        loadable[key] = value
    model.load_state_dict(loadable, strict=False)
    replaced = head_keys if reason else set()
    mismatched_keys = {m.split(": ", 1)[0] for m in mismatched}
    missing = [k for k in target if k not in loadable and k not in replaced and k not in mismatched_keys]
    unexpected = [k for k in state if k not in target]
    head_report: dict[str, Any] = {"module": head_name, "replaced": bool(reason)}
    if reason and head is not None and source_head is not None:
        head_report.update(
            reason=reason,
            from_classes=len(source_classes) if source_classes else int(source_head.shape[0]),
            to_classes=head.out_features,
            new=f"Linear({head.in_features} -> {head.out_features})",
        )
    return {
        "loaded": len(loadable),
        "total": len(target),
        "head": head_report,
        "adapted": adapted,
        "stripped_prefix": stripped,
        "head_renamed_from": head_alias,
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
    }


def _classifier_or_none(model: nn.Module) -> tuple[str | None, nn.Linear | None]:
    try:
        return find_classifier(model)
    except UserError:  # a model without a Linear head (a user's conv head): loaded as it is
        return None, None


def _strip_prefix(state: dict[str, torch.Tensor], target: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Drop a wrapper prefix shared by every key (DataParallel's 'module.', torch.compile's '_orig_mod.', a
    Lightning module's 'model.') when that makes more keys fit the model."""
    stripped = ""
    while state and sum(k in target for k in state) < len(state) / 2:
        first = {k.split(".", 1)[0] for k in state}
        if len(first) != 1 or not all("." in k for k in state):
            break
        prefix = f"{first.pop()}."
        candidate = {k[len(prefix) :]: v for k, v in state.items()}
        if sum(k in target for k in candidate) <= sum(k in target for k in state):
            break
        state, stripped = candidate, stripped + prefix
    return state, stripped or None


def _alias_head(
    state: dict[str, torch.Tensor], target: dict[str, Any], head_name: str, head_keys: set[str]
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The classifier under another name (`fc` vs `fc.1` with model.dropout): when the model's head keys are
    absent and exactly one unexpected Linear (weight and bias) is left in the weights, that one is the head."""
    if any(k in state for k in head_keys):
        return state, None
    linears = [
        k[: -len(".weight")]
        for k, v in state.items()
        if k.endswith(".weight") and k not in target and v.ndim == 2 and f"{k[: -len('.weight')]}.bias" in state
    ]
    if len(linears) != 1:
        return state, None
    old = linears[0]
    rename = {f"{old}.weight": f"{head_name}.weight", f"{old}.bias": f"{head_name}.bias"}
    return {rename.get(k, k): v for k, v in state.items()}, old


def _first_conv_key(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


def _channels_only(value: torch.Tensor, want: torch.Tensor) -> bool:
    return value.ndim == 4 and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]


def _adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB -> grey: sum over the input channels (a grey image repeated as RGB gives the same output, as timm
    does); grey -> RGB and other counts: repeat, scaled so the output keeps its size."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    repeats = -(-channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (weight.shape[1] / channels)


# ---------------------------------------------------------------------------------------------------------------
# 4. What trains when


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
        block below the top one); None for plain full training. Frozen parameters are in the groups too: while
        they have no gradient the optimizer skips them (no update, no weight decay), and once unfrozen they train."""
        if self.policy == "full" and self.backbone_lr_mult == 1.0 and self.layer_decay == 1.0:
            return None
        groups: list[dict[str, Any]] = [{"name": self.head_name, "params": self.head_params, "lr_mult": 1.0}]
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


def describe_load(report: dict[str, Any]) -> list[str]:
    """The load report as log lines."""
    lines = [f"weights: {report['origin']}: loaded {report['loaded']}/{report['total']} tensors"]
    head = report["head"]
    if head["replaced"]:
        lines.append(
            f"head {head['module']} replaced ({head['reason']}): {head['from_classes']} -> {head['to_classes']} "
            f"classes, a new {head['new']}"
        )
    for line in report["adapted"]:
        lines.append(f"first convolution adapted: {line}")
    for key in ("missing", "unexpected", "mismatched"):
        if report[key]:
            shown = ", ".join(report[key][:5]) + (f", ... ({len(report[key])} in all)" if len(report[key]) > 5 else "")
            lines.append(f"{key} keys: {shown}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# 5. What the runner shows and records


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
        "image_size": data.image_size,
        "from": stats_from,
    }
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["finetune"] = policy.summary(lr) if policy else {"policy": "full"}
    return summary
