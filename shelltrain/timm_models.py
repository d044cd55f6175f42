"""timm models (`model=timm model.name=convnext_atto`, optional extra `shelltrain[timm]`): built by timm's
create_model for the data's classes and input channels, and `model.weights=timm` loaded by timm's own pretrained
mechanism (its Hugging Face hub cache, or `model.pretrained_file` offline). The weights then go through the same
transfer path as torchvision's (head replacement, preprocessing from `timm.data.resolve_data_config`)."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig
from torch import nn

from shelltrain.errors import UserError
from shelltrain.imagesize import plain_size

INSTALL = 'pip install "shelltrain[timm]"'


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(f"model=timm needs timm: {INSTALL}") from None
    return timm


def _check_name(timm: Any, name: str, pretrained: bool = False) -> None:
    """A name timm does not know is one line with the closest names and how to list them."""
    if name in timm.list_models(pretrained=pretrained) or (not pretrained and timm.is_model(name)):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"model.name={name!r} is not a timm model{hint} "
        "(list them: python -c \"import timm; print(timm.list_models('convnext*'))\")"
    )


def build_timm(cfg: DictConfig, num_classes: int, in_channels: int) -> nn.Module:
    """timm's own builder: it sizes the head and the stem for the data (random initialisation)."""
    timm = _timm()
    _check_name(timm, cfg.name)
    return timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def open_timm_weights(spec: str, model_cfg: DictConfig) -> dict[str, Any]:
    """`model.weights=timm`: the pretrained model as timm loads it (its default pretrained tag, from the hub cache
    or `model.pretrained_file`) and its preprocessing. Returns WeightsSource's fields."""
    timm = _timm()
    name = model_cfg.name
    if spec != "timm":
        raise UserError(
            f"model.weights={spec}: a timm model takes model.weights=timm (timm's pretrained weights) "
            "or a checkpoint path (a shelltrain run directory, .pt/.pth or .safetensors)"
        )
    _check_name(timm, name)
    file = model_cfg.pretrained_file
    overlay = {"file": str(file)} if file else {}
    try:
        pretrained = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # no network, no cached file, a file of another model
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(
            f"model.weights=timm: cannot load timm's pretrained {name} ({reason}); without network, give the file: "
            "model.pretrained_file=/path/to/model.safetensors"
        ) from None
    config = timm.data.resolve_data_config({}, model=pretrained)
    preprocessing = {
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "image_size": plain_size([int(side) for side in config["input_size"][-2:]]),  # C x H x W
    }
    tag = pretrained.pretrained_cfg.get("tag") or "default"
    origin = f"timm {name}.{tag}" + (f" ({file})" if file else "")
    return {
        "spec": spec,
        "kind": "timm",
        "origin": origin,
        "state_dict": pretrained.state_dict(),
        "preprocessing": preprocessing,
        "model_name": name,
    }


def timm_layer_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]] | None:
    """timm's own layer grouping for layer-wise learning-rate decay, stem first and the head's layer last: the
    model's `group_matcher` as `timm.optim.param_groups_layer_decay` reads it (a parameter it leaves out goes to the
    top layer, as there). None for a model without a `group_matcher` (torchvision's, shelltrain's cnn)."""
    if not callable(getattr(model, "group_matcher", None)):
        return None
    from timm.models import group_parameters

    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer_of.values())
    layers: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        layers.setdefault(layer_of.get(name, top), []).append((name, param))
    return [(_layer_name([n for n, _ in layers[i]]), [p for _, p in layers[i]]) for i in sorted(layers)]


def _layer_name(names: list[str]) -> str:
    """The modules a layer holds: their common prefix (`stages.1.blocks.1`), else its top-level modules joined."""
    modules = [name.split(".")[:-1] or [name] for name in names]
    common = os.path.commonprefix(modules)  # element-wise on lists too
    return ".".join(common) if common else "+".join(dict.fromkeys(m[0] for m in modules))
