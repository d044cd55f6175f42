"""Grad-CAM overlays (the `grad-cam` library): where in each image the model looked for the class it predicted, for
the top-loss gallery (plots/top_losses_cam.png) and for `task=predict predict.cam=true` (cam/ in the run dir).

The layer is found by running one example through the model: the last module whose output is still an image-shaped
map larger than 1x1 (the last conv block before global pooling, for torchvision, timm and the small cnn alike), or
the module path a user names. Where a CAM cannot apply (an int8 model has no gradients, an ensemble no single
layer, the library is not installed) the caller says so in one line and the rest of the run goes on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from torch import nn
from torch.utils.data import Dataset

from shelltrain.console import say
from shelltrain.errors import UserError
from shelltrain.placement import is_quantized
from shelltrain.preprocess import Preprocessing

INSTALL = 'pip install "shelltrain[explain]"'
IMAGE_WEIGHT = 0.55  # the image's share of an overlay: the digit or object stays visible under the heat map
GALLERY_PLOT = "top_losses_cam.png"  # in plots/: the top-loss gallery with each image's CAM
FOLDER = "cam"  # task=predict predict.cam=true: one overlay per input image, in the run dir
MIN_SIDE = 128  # overlays smaller than this are enlarged (nearest pixel) by a whole factor to be readable


@dataclass
class Cam:
    """A request for Grad-CAM overlays: the model, the module path the user named (None: found automatically), the
    config key that names it (for messages) and the console for the one line saying why a CAM is skipped."""

    model: nn.Module
    layer: str | None
    key: str
    console: Console
    kind: str = "model"  # model | ensemble (TrainedModel.kind)


def usable(cam: Cam) -> bool:
    """Whether a CAM can be drawn for this model; if not, says why in one line."""
    reason = None
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        reason = f"the grad-cam library is not installed ({INSTALL})"
    elif cam.kind == "ensemble":
        reason = "an ensemble fuses several models' outputs and has no one layer to explain"
    elif is_quantized(cam.model):
        reason = "an int8 model has no gradients to weigh its layers with"
    if reason:
        say(cam.console, escape(f"Grad-CAM skipped: {reason}"))  # [explain] is not markup
    return reason is None


def find_layer(model: nn.Module, example: torch.Tensor, path: str | None, key: str) -> tuple[str, nn.Module]:
    """The target layer and its module path: `path` when given, else the last module (in the order they run) whose
    output is an N x C x H x W map with H x W > 1, i.e. the last conv block before global pooling."""
    if path:
        try:
            return path, model.get_submodule(path)
        except AttributeError as error:
            owner = type(model).__name__
            raise UserError(f"{key}={path!r} names no module of {owner}; use a path such as 'layer4'") from error
    names = {module: name for name, module in model.named_modules()}
    last: list[nn.Module] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            last[:] = [module]

    hooks = [m.register_forward_hook(record) for m in names if m is not model]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not last:
        raise UserError(f"no layer of {type(model).__name__} gives an image-shaped map to explain; name one: {key}=...")
    return names[last[0]], last[0]


def heat_maps(model: nn.Module, layer: nn.Module, batch: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM of `classes[i]` for each image of `batch` (normalized as the model takes it): N x H x W in [0, 1].
    Gradients are enabled here (a test step runs under no_grad) and the input asks for them, so a model whose
    weights are frozen still has a path to the target layer."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    device = _device(model)
    try:
        with torch.enable_grad(), GradCAM(model=model.eval(), target_layers=[layer]) as cam:
            inputs = batch.detach().float().to(device).requires_grad_(True)
            return cam(input_tensor=inputs, targets=[ClassifierOutputTarget(k) for k in classes])
    finally:
        model.train(was_training)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """An H x W x C image in [0, 1] (C = 1: grey) with its heat map blended over it: H x W x 3 in [0, 1]."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    blended = show_cam_on_image(rgb.astype(np.float32), heat, use_rgb=True, image_weight=IMAGE_WEIGHT)
    return blended.astype(np.float32) / 255.0


def draw(cam: Cam, batch: torch.Tensor, shown: list[np.ndarray], classes: list[int]) -> list[np.ndarray]:
    """The overlays of `classes` on `shown` (the images as people see them; `batch` as the model takes them)."""
    _, layer = find_layer(cam.model, batch[:1].to(_device(cam.model)), cam.layer, cam.key)
    heats = heat_maps(cam.model, layer, batch, classes)
    return [overlay(image, heat) for image, heat in zip(shown, heats)]


def write_overlays(
    cam: Cam, dataset: Dataset, names: list[str], classes: list[int], pre: Preprocessing, folder: Path, batch_size: int
) -> int:
    """One overlay PNG per image of `dataset` (normalized as `pre` says), `folder`/<its name>.png, for the class in
    `classes`; returns how many were written (0 where a CAM cannot apply, said in one line)."""
    if not usable(cam):
        return 0
    for start in range(0, len(names), batch_size):
        chunk = range(start, min(start + batch_size, len(names)))
        batch = torch.stack([dataset[i][0].float() for i in chunk])
        for i, image in zip(chunk, draw(cam, batch, pre.pictures(batch), [classes[i] for i in chunk])):
            save_png(image, folder / f"{names[i]}.png")
    return len(names)


def save_png(image: np.ndarray, path: Path) -> Path:
    """An H x W x 3 image in [0, 1] as a PNG, enlarged by a whole factor (nearest pixel) to at least MIN_SIDE."""
    factor = max(1, -(-MIN_SIDE // max(image.shape[:2])))
    picture = Image.fromarray((image * 255).round().astype(np.uint8))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
