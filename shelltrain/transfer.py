"""Transfer learning's first half: where pretrained weights come from and how they fit the model.

Two steps, each a plain function the runner calls in order (what trains when is `shelltrain.finetune`):

1. `open_weights(cfg.model)` reads `model.weights` (torchvision weights by enum name, a shelltrain run
   directory or checkpoint, a plain state dict, a .safetensors file) into a `WeightsSource`, which
   also knows the preprocessing the weights were trained with (`follow_weights` hands it to the data stage).
2. `load_weights(model, source, ...)` copies the tensors into the freshly built model: head surgery
   (the classifier is not loaded when the classes differ), a first convolution summed over its input
   channels for grey images, wrapper prefixes stripped; missing, unexpected and mismatched keys are
   reported (and are errors under `model.strict`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from shelltrain.checkpoint import check_regular_file, safe_load
from shelltrain.dataroot import user_path
from shelltrain.errors import UserError
from shelltrain.imagesize import plain_size, size_hw
from shelltrain.models import find_classifier
from shelltrain.timm_models import open_timm_weights
from shelltrain.trained import read_checkpoint, rebuild_architecture, resolve, split_weights

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


# ---------------------------------------------------------------------------------------------------------------
# 1. Opening the weights


@dataclass
class WeightsSource:
    """Pretrained weights, read but not yet loaded into a model."""

    spec: str  # model.weights as the user wrote it
    kind: str  # torchvision | timm | shelltrain | state_dict | safetensors
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
    base, weights = split_weights(spec)
    path = user_path(base)
    if model_cfg.get("library") == "timm" and not path.exists():
        return WeightsSource(**open_timm_weights(spec, model_cfg))
    if path.is_dir() or weights:  # a run directory: its weights as the trained model's loader picks them
        path, _ = resolve(spec, "model.weights")
        if path.is_dir():
            raise UserError(
                f"model.weights: '{path}' is an ensemble run, not one model; fuse it with ensemble=average "
                "(ensemble.checkpoints) or start from one member's run directory"
            )
        return checkpoint_source(spec, path, read_checkpoint(path, "model.weights"))
    if path.exists():
        return _open_file(spec, path)
    if "/" in spec or os.sep in spec or spec.lower().endswith(CHECKPOINT_SUFFIXES) or spec.startswith("~"):
        raise UserError(
            f"model.weights: '{path}' does not exist; give a shelltrain run directory, a .pt/.pth/.safetensors "
            "file, or a torchvision weights name such as DEFAULT"
        )
    return _open_torchvision(spec, model_cfg)


def _open_file(spec: str, path: Path) -> WeightsSource:
    """A shelltrain checkpoint, a plain state dict (or a dict holding one) or a .safetensors file."""
    if path.suffix == ".safetensors":
        return WeightsSource(spec, "safetensors", str(path), state_dict=_read_safetensors(path))
    payload = _torch_load(path)
    if isinstance(payload.get("model"), dict) or "pruning" in payload:
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

    check_regular_file(path, f"model.weights: '{path}'")
    with open(path, "rb") as f:  # an 8-byte little-endian header length, then that much JSON, then the tensors
        head = f.read(8)
    size = path.stat().st_size
    if len(head) < 8 or int.from_bytes(head, "little") > size - 8:
        raise UserError(
            f"model.weights: '{path}' is not a readable .safetensors file ({size} bytes; its header length "
            "does not fit the file: truncated, or not written by safetensors)"
        )
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
    checked = _cached_file_check(file)  # a file already there is not checked by torch.hub; a download is
    try:
        pretrained = torchvision.models.get_model(source.model_name, weights=source.enum)
    except Exception as exc:  # no network (URLError), a corrupt cache file, a planted file of the wrong model
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(
            f"model.weights={source.spec}: cannot load {source.origin} ({reason}); "
            f"without network, put the file at {file} (TORCH_HOME sets the folder)"
        ) from None
    source.origin = f"{source.origin} ({file}{checked})"
    return pretrained.state_dict()


def _cached_file_check(file: Path) -> str:
    """What the origin line says of a file already in torchvision's cache: torch.hub checks the SHA256 prefix a file
    name carries (`resnet18-f37072fd.pth`) only when it downloads, so any file put there would pass as the published
    weights. Checked here: "" for a file about to be downloaded (and checked by torch.hub), else verified or not."""
    if not file.is_file():
        return ""
    found = re.search(r"-([a-f0-9]{8,})\.", file.name)
    if found is None:
        return "; UNVERIFIED: its name carries no SHA256 prefix to check"
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest().startswith(found[1]):
        return f"; SHA256 {found[1]} verified"
    return (
        f"; UNVERIFIED: its SHA256 {digest.hexdigest()[: len(found[1])]} is not the {found[1]} torchvision published, "
        "so these are not torchvision's weights: delete the file to download them"
    )


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
        data_cfg.image_size = plain_size(weights["image_size"])
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
    if weights.get("image_size") and size_hw(data_cfg.image_size) != size_hw(weights["image_size"]):
        differ.append(f"data.image_size=null (={plain_size(weights['image_size'])})")
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
        model = rebuild_architecture(model, source.checkpoint, example_inputs)
        if source.state_dict is None:
            raise UserError(f"model.weights: '{source.origin}' holds no single model's state dict")
    if source.kind == "torchvision" and source.state_dict is None:
        source.state_dict = _torchvision_state_dict(source)
    assert source.state_dict is not None
    report = transfer_state(model, source.state_dict, source_classes=source.classes, target_classes=classes)
    report = {"weights": source.spec, "kind": source.kind, "origin": source.origin, **report}
    head = f"{report['head']['module']}."
    missing = [k for k in report["missing"] if not k.startswith(head)]  # weights without a head: it starts new
    problems = missing + report["unexpected"] + report["mismatched"]
    if not report["loaded"]:
        trained_as = f" (it was trained as model {source.model_name!r})" if source.model_name else ""
        raise UserError(
            f"model.weights: no tensor of {source.origin} fits this model{trained_as}; pick the model and options "
            f"the weights were trained with. First keys: {', '.join(list(source.state_dict)[:3])}"
        )
    if strict and problems:
        raise UserError(
            f"model.strict=true: {source.origin} does not fit exactly: {len(missing)} missing, "
            f"{len(report['unexpected'])} unexpected, {len(report['mismatched'])} mismatched "
            f"(first: {problems[0]}); set model.strict=false to load what fits"
        )
    return model, report


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
    """Drop a wrapper prefix (DataParallel's and AveragedModel's 'module.', torch.compile's '_orig_mod.', a Lightning
    module's 'model.') from the keys that carry it, when that makes more keys fit the model; keys without it (e.g.
    AveragedModel's `n_averaged`) stay as they are."""
    stripped = ""
    while state and sum(k in target for k in state) < len(state) / 2:
        firsts = Counter(k.split(".", 1)[0] for k in state if "." in k)
        if not firsts:
            break
        prefix = f"{firsts.most_common(1)[0][0]}."
        candidate = {k.removeprefix(prefix): v for k, v in state.items()}
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
