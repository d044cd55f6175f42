"""Non-square input (`data.image_size=[H, W]`): the size helper, the resize every image gets, the preprocessing a
checkpoint records, on-device augmentation, TTA, the cache and following pretrained weights, each at H != W."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shelltrain.data.batched import ResizedCrop, Warp
from shelltrain.data.cache import cached_images
from shelltrain.data.device import Shift, batched_augmentations
from shelltrain.data.transforms import fit_size
from shelltrain.errors import UserError
from shelltrain.imagesize import covering, plain_size, size_hw, size_text
from shelltrain.models import SmallCNN, first_forward
from shelltrain.preprocess import InputAdapter, Preprocessing
from shelltrain.transfer import WeightsSource, follow_weights
from shelltrain.tta import tta_views

H, W = 12, 20


def test_an_int_is_a_square_and_a_pair_is_height_then_width():
    assert size_hw(32) == (32, 32)
    assert size_hw([16, 24]) == (16, 24) and size_hw((24, 16)) == (24, 16)
    assert size_hw(OmegaConf.create({"s": [16, 24]}).s) == (16, 24)  # as the config hands it over
    assert plain_size((32, 32)) == 32 and plain_size([16, 24]) == [16, 24]  # written down as before for squares
    assert size_text(32) == "32x32" and size_text([16, 24]) == "16x24"
    assert covering((20, 40), [12, 30]) == (15, 30) and covering((40, 20), [12, 30]) == (60, 30)
    assert covering((30, 40), 16) == (16, 21)  # a square size: the shorter side, as torchvision's resize to an int


@pytest.mark.parametrize(
    "value, says",
    [
        ([0, 8], "data.image_size=[0, 8] is out of range; it must be >= 1"),
        (0, "data.image_size=0 is out of range; it must be >= 1"),
        ([8], "data.image_size=[8] gives one side"),
        ("a", "data.image_size='a' is not an image size"),
        ([8, 8, 8], "data.image_size=[8, 8, 8] is not an image size"),
        (2.5, "data.image_size=2.5 is not an image size"),
        (True, "data.image_size=True is not an image size"),
    ],
)
def test_a_bad_size_is_one_line_naming_the_key_and_the_two_forms(value, says):
    with pytest.raises(UserError) as caught:
        size_hw(value)
    message = str(caught.value)
    assert message.startswith(says) and "\n" not in message
    assert "[height, width]" in message


def picture(height: int, width: int, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(height * 100 + width)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("shape", [(30, 40), (40, 30), (25, 25), (8, 8), (64, 17)])
def test_a_square_size_is_the_shorter_side_scaled_and_center_cropped_as_before(shape):
    image = picture(*shape)
    before = F.center_crop(F.resize(image, [16], antialias=True), [16, 16])  # the resize every earlier run used
    assert torch.equal(fit_size(image, 16), before)


@pytest.mark.parametrize(
    "shape, size, scaled",
    [
        ((20, 40), [H, 30], (15, 30)),  # the width binds: 30 / 40 > 12 / 20
        ((40, 20), [H, 30], (60, 30)),  # a tall image into a wide size: scaled to the width, cropped in height
        ((24, 40), [H, W], (H, W)),  # the same aspect ratio: scaled, nothing cropped
        ((6, 10), [H, W], (H, W)),  # upscaled
        ((H, W), [H, W], None),  # already that size: untouched
    ],
)
def test_a_non_square_size_scales_until_the_image_covers_it_then_center_crops(shape, size, scaled):
    image = picture(*shape)
    out = fit_size(image, size)
    assert out.dtype == torch.uint8 and tuple(out.shape[-2:]) == tuple(size)
    if scaled is None:
        assert out is image
    else:
        assert torch.equal(out, F.center_crop(F.resize(image, list(scaled), antialias=True), size))


def test_preprocessing_records_height_and_width_and_reads_old_square_checkpoints():
    wide = Preprocessing.of_checkpoint(
        {"preprocessing": {"image_size": [16, 24], "channels": 1, "mean": [0.5], "std": [0.2]}}
    )
    assert wide.image_size == (16, 24) and wide.shape == (1, 16, 24)
    assert wide.as_dict()["image_size"] == [16, 24] and "16x24 px" in wide.describe()
    old = Preprocessing.of_checkpoint(
        {"preprocessing": {"image_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3}}
    )
    assert old.image_size == (32, 32) and old.as_dict()["image_size"] == 32  # written back as it was read
    assert not wide.same_inputs(Preprocessing([24, 16], 1, (0.5,), (0.2,)))
    assert wide.same_inputs(Preprocessing((16, 24), 1, (0.5,), (0.2,)))


def test_an_input_adapter_brings_a_batch_to_the_models_height_and_width_as_its_own_images_were():
    seen = []
    model = nn.Module()
    model.forward = lambda x: seen.append(x) or x.mean((1, 2, 3))[:, None]
    given, wanted = Preprocessing(32, 1, (0.5,), (0.25,)), Preprocessing([16, 24], 1, (0.4,), (0.2,))
    batch = torch.rand(2, 1, 32, 32)
    InputAdapter(model, given, wanted)(batch)
    pixels = batch * 0.25 + 0.5  # un-normalized, scaled to cover 16 x 24 (24 x 24), the centre rows kept
    covered = torch.nn.functional.interpolate(pixels, size=(24, 24), mode="bilinear", antialias=True)
    assert torch.allclose(seen[0], (F.center_crop(covered, [16, 24]) - 0.4) / 0.2, atol=1e-6)


def test_a_rotation_on_the_device_turns_a_non_square_image_as_torchvision_does():
    image = torch.zeros(1, 1, H, W, dtype=torch.uint8)
    image[..., 3:9, 4:16] = 255
    image[..., 1:4, 1:4] = 128
    for degrees in (30.0, 90.0):
        ours = Warp((degrees, degrees), None, None, "nearest", 0)(image)
        theirs = F.rotate(image, degrees, interpolation=v2.InterpolationMode.NEAREST)
        assert torch.equal(ours, theirs), degrees


def test_crops_to_data_image_size_have_batched_forms_at_height_and_width():
    transforms = [v2.RandomCrop([H, W], padding=2, padding_mode="reflect"), v2.RandomResizedCrop([H, W])]
    batched, missing = batched_augmentations(transforms, OmegaConf.create([H, W]), ["RandomCrop", "RandomResizedCrop"])
    assert missing is None and isinstance(batched[0], Shift) and isinstance(batched[1], ResizedCrop)
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (8, 3, H, W), dtype=torch.uint8)
    for op in batched:
        out = op(batch)
        assert out.shape == batch.shape and out.dtype == torch.uint8 and not torch.equal(out, batch)
    other, missing = batched_augmentations([v2.RandomCrop([W, H])], [H, W], ["RandomCrop"])
    assert other == [] and missing == "RandomCrop"  # a crop to another size keeps the loader path


def test_five_crop_views_keep_height_and_width():
    images = torch.arange(2 * H * W, dtype=torch.float32).view(2, 1, H, W)
    views = tta_views(images, "five_crop")
    assert len(views) == 5 and all(v.shape == images.shape for v in views)
    h, w = round(H * 0.875), round(W * 0.875)  # 10 x 18: each side cropped by its own fraction
    corner = torch.nn.functional.interpolate(images[..., :h, :w], size=(H, W), mode="bilinear", align_corners=False)
    assert torch.equal(views[0], corner)


def test_the_cache_stores_images_at_height_and_width_under_its_own_key(tmp_path):
    paths = []
    for i, size in enumerate([(40, 30), (30, 40), (20, 20)]):  # PIL sizes: width x height
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(picture(size[1], size[0]).permute(1, 2, 0).numpy()).save(paths[-1])
    settings = ("memory", str(tmp_path / "cache"), 1.0, 1, "stat")  # how, cache_dir, max GiB, workers, check
    wide = cached_images(str(tmp_path), paths, "RGB", [H, W], *settings)
    square = cached_images(str(tmp_path), paths, "RGB", 16, *settings)
    assert wide.shape == (3, 3, H, W) and square.shape == (3, 3, 16, 16)
    for i, path in enumerate(paths):
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(wide[i], fit_size(image, [H, W]))
    keys = sorted(p.read_text() for p in (tmp_path / "cache").glob("*.json"))
    assert len(keys) == 2 and any('"size": [12, 20]' in k for k in keys) and any('"size": 16' in k for k in keys)


def test_a_model_that_cannot_take_the_input_names_the_size_as_written():
    with pytest.raises(UserError, match=r"^data\.image_size=\[1, 8\]: the model cannot run on \(1, 1, 8\) inputs"):
        first_forward(SmallCNN(3, in_channels=1), torch.zeros(2, 1, 1, 8))


def test_data_image_size_null_follows_non_square_weights():
    weights = WeightsSource("x", "timm", "timm x", None, None, {"mean": [0.5], "std": [0.5], "image_size": [16, 24]})
    data = OmegaConf.create({"image_size": None, "mean": None, "std": None})
    followed, stats, where = follow_weights(data, weights)
    assert size_hw(followed.image_size) == (16, 24) and stats == ([0.5], [0.5]) and where == "weights"
