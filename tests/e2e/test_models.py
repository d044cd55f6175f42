"""Model construction adapts any architecture to the data: classes, channels, small inputs, dropout."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, run_in_process
from torch import nn

from shelltrain.errors import UserError
from shelltrain.models import build_model, find_classifier


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "cnn"])
def test_each_model_option_maps_grey_images_to_classes(name):
    cfg = compose_config(f"model={name}").model
    model = build_model(cfg, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_any_torchvision_model_by_name():
    cfg = compose_config("model=torchvision", "model.name=squeezenet1_0").model
    model = build_model(cfg, num_classes=3, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_unknown_model_name_suggests_close_ones():
    cfg = compose_config("model=torchvision", "model.name=resnet188").model
    with pytest.raises(UserError, match="did you mean resnet18"):
        build_model(cfg, 10, 3)


def test_small_input_stem_keeps_resolution():
    plain = build_model(compose_config("model=resnet18").model, 10, 3)
    small = build_model(compose_config("model=resnet18", "model.small_input=true").model, 10, 3)
    assert plain.conv1.stride == (2, 2) and isinstance(plain.maxpool, nn.MaxPool2d)
    assert small.conv1.stride == (1, 1) and small.conv1.kernel_size == (3, 3)
    assert isinstance(small.maxpool, nn.Identity)


def test_dropout_goes_in_front_of_the_head():
    model = build_model(compose_config("model=resnet18", "model.dropout=0.3").model, 10, 3)
    assert isinstance(model.fc, nn.Sequential) and isinstance(model.fc[0], nn.Dropout) and model.fc[0].p == 0.3
    assert find_classifier(model)[0] == "fc.1"


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def test_user_model_from_target_trains(tmp_path):
    summary = run_in_process(
        tmp_path,
        "~model",
        "+model._target_=test_models.TinyNet",
        "+model.hidden=32",
        "debug=smoke",
        "scheduler=none",
        "data.image_size=8",
    )
    assert summary["status"] == "completed"
    assert summary["params"] == 64 * 32 + 32 + 32 * 10 + 10
