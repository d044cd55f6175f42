"""Grad-CAM overlays (shelltrain.cam, the grad-cam library): the top-loss gallery's, task=predict's on request, the
layer found on torchvision models, and the one line where a CAM cannot apply."""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_in_process
from PIL import Image
from rich.console import Console
from torch import nn

from shelltrain import cam as cam_module
from shelltrain.cam import Cam, find_layer, usable, write_overlays
from shelltrain.data import build_data
from shelltrain.engine import predict
from shelltrain.metrics import confusion_matrix, per_class_metrics
from shelltrain.models import SmallCNN
from shelltrain.painting import Painter
from shelltrain.predictions import error_analysis
from shelltrain.schema import defaults
from shelltrain.trained import open_trained

pytest.importorskip("pytorch_grad_cam", reason='Grad-CAM needs pip install "shelltrain[explain]"')

TINY = ["model=cnn", "model.width=8", "data.image_size=16", "trainer.epochs=1", "trainer.limit_train_batches=4"]


def recording() -> Console:
    return Console(file=io.StringIO(), width=200)


def heat_spread(picture: np.ndarray) -> float:
    """How far the overlay's colours vary across its pixels: a uniform heat map over a blank image gives ~0."""
    return float(picture.reshape(-1, picture.shape[-1]).std(0).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cam_trained")
    run_in_process(run_dir, *TINY, "plots=false")
    return run_dir


def test_the_gallery_gets_a_cam_overlay_of_the_same_images(trained, tmp_path):
    model = open_trained(trained).module
    cfg = compose_config(*TINY)
    data = build_data(cfg.data, cfg.augmentation, seed=0)
    settings = defaults("trainer", epochs=0, device=torch.device("cpu"), channels_last=False)
    logits, targets = predict(model, data.test, settings, limit=1)
    per_class = per_class_metrics(confusion_matrix(logits, targets, data.num_classes), data.classes)
    request = Cam(model, None, "report.cam_layer", recording())
    error_analysis(tmp_path, logits, targets, data.test.dataset, data, "test", per_class, Painter(0), cam=request)
    plain = np.asarray(Image.open(tmp_path / "plots/top_losses.png").convert("RGB"), dtype=np.float32) / 255
    overlaid = np.asarray(Image.open(tmp_path / "plots/top_losses_cam.png").convert("RGB"), dtype=np.float32) / 255
    assert overlaid.shape == plain.shape  # the same gallery, tile for tile
    changed = np.abs(overlaid - plain).max(-1) > 0.05
    assert 0.05 < changed.mean() < 0.9  # the tiles are coloured, the margins and titles are not
    assert heat_spread(overlaid[changed]) > 0.05  # heat that varies, not one colour over every pixel
    assert request.console.file.getvalue() == ""  # nothing skipped


def test_predict_writes_one_overlay_per_image_named_after_it(trained, tmp_path):
    cfg = compose_config(*TINY)
    data = build_data(cfg.data, cfg.augmentation, seed=0)
    folder = tmp_path / "images"
    for i, image in enumerate(data.test.dataset.images[:5]):
        (folder / f"group{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"group{i % 2}" / f"{i:02d}.png")
    run = tmp_path / "run"
    run_in_process(run, "task=predict", f"model.weights={trained}", f"predict.input={folder}", "predict.cam=true")
    written = sorted(p.relative_to(run / "cam").as_posix() for p in (run / "cam").rglob("*.png"))
    assert written == sorted(f"group{i % 2}/{i:02d}.png.png" for i in range(5))
    for path in (run / "cam").rglob("*.png"):
        picture = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        assert picture.shape == (128, 128, 3)  # 16 px enlarged 8 times
        assert heat_spread(picture) > 0.05


def test_resnet18_finds_its_last_conv_block(tmp_path):
    run_in_process(tmp_path, "model=resnet18", "data.image_size=32", "debug=smoke", "plots=false")
    model = open_trained(tmp_path).module
    at = {size: find_layer(model, torch.zeros(1, 1, size, size), None, "predict.cam_layer")[0] for size in (32, 64)}
    assert at == {64: "layer4", 32: "layer3"}  # at 32 px layer4's map is 1x1: one value, a uniform heat map
    assert find_layer(model, torch.zeros(1, 1, 32, 32), "layer3.1", "predict.cam_layer")[0] == "layer3.1"


def test_an_int8_model_is_skipped_with_one_line(tmp_path):
    model = SmallCNN(3, in_channels=1, width=8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    request = Cam(quantized, None, "predict.cam_layer", recording())
    assert write_overlays(request, [], [], [], None, tmp_path / "cam", 8) == 0
    shown = request.console.file.getvalue().splitlines()
    assert shown == ["Grad-CAM skipped: an int8 model has no gradients to weigh its layers with"]
    assert not (tmp_path / "cam").exists()


def test_without_the_library_the_line_names_the_extra(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(cam_module.importlib.util, "find_spec", lambda n: None if n == "pytorch_grad_cam" else found(n))
    request = Cam(SmallCNN(3, in_channels=1, width=8), None, "report.cam_layer", recording())
    assert not usable(request)
    assert 'pip install "shelltrain[explain]"' in request.console.file.getvalue()


def test_a_training_run_and_evaluate_draw_the_gallerys_cam_when_report_cam_is_on(tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    tiny = ["model=cnn", "model.width=8", "data.image_size=16", "debug=smoke", "trainer.threads=1", "plots=true"]
    run_in_process(tmp_path / "run", *tiny, "report.cam=true")
    gallery = tmp_path / "run/plots/top_losses_cam.png"
    assert Image.open(gallery).size == Image.open(tmp_path / "run/plots/top_losses.png").size
    run_in_process(
        tmp_path / "evaluate", "task=evaluate", f"model.weights={tmp_path / 'run'}", "plots=true", "report.cam=true"
    )
    assert (tmp_path / "evaluate/plots/top_losses_cam.png").is_file()
    run_in_process(tmp_path / "off", *tiny)  # the default
    assert (tmp_path / "off/plots/top_losses.png").is_file() and not (
        tmp_path / "off/plots/top_losses_cam.png"
    ).exists()
