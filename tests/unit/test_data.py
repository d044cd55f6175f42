"""Which images go where: stratified splits, a class subset relabelled, a per-class budget; and a user's
`data.source` read into uint8 images."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from shelltrain.data.sources import user_source
from shelltrain.data.splits import budget, select_classes, split_indices
from shelltrain.errors import UserError
from shelltrain.schema import packaged

LABELS = torch.arange(100) % 4  # 25 images of each of 4 classes


def config(**overrides) -> OmegaConf:
    base = {"name": "digits", "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0, "limit_samples": None}
    return OmegaConf.merge(packaged("data"), {**base, **overrides})


def test_stratified_split_sizes_and_no_overlap():
    splits = split_indices({"train": LABELS}, config())
    sizes = {name: len(index) for name, (_, index) in splits.items()}
    assert sizes == {"train": 64, "val": 16, "test": 20}  # test first (20 of 100), then val (20% of the 80 left)
    everything = torch.cat([index for _, index in splits.values()])
    assert sorted(everything.tolist()) == list(range(100))
    for name in ("val", "test"):
        counts = torch.bincount(LABELS[splits[name][1]], minlength=4)
        assert counts.max() - counts.min() <= 1  # stratified: every class alike


def test_a_source_split_is_kept_not_carved():
    splits = split_indices({"train": LABELS, "test": torch.tensor([0, 1, 2])}, config())
    assert splits["test"][0] == "test" and splits["test"][1].tolist() == [0, 1, 2]
    assert splits["val"][0] == splits["train"][0] == "train"
    assert len(splits["train"][1]) + len(splits["val"][1]) == 100


def test_split_indices_are_fixed_by_the_split_seed():
    a = split_indices({"train": LABELS}, config())
    b = split_indices({"train": LABELS}, config())
    c = split_indices({"train": LABELS}, config(split_seed=1))
    assert torch.equal(a["val"][1], b["val"][1]) and not torch.equal(a["val"][1], c["val"][1])


def test_a_class_subset_is_relabelled_in_the_order_given():
    images = torch.arange(100).view(100, 1, 1, 1)
    sources, classes = select_classes({"train": (images, LABELS)}, ["a", "b", "c", "d"], config(classes=["d", 1]))
    kept, labels = sources["train"]
    assert classes == ["d", "b"]
    assert len(labels) == 50 and set(labels.tolist()) == {0, 1}
    assert (LABELS[kept.flatten()] == torch.tensor([3, 1])[labels]).all()  # each image keeps its class
    with pytest.raises(UserError, match="data.classes: 'z' is not a class"):
        select_classes({"train": (images, LABELS)}, ["a", "b", "c", "d"], config(classes=["a", "z"]))


def test_samples_per_class_budget():
    index = torch.arange(100)
    kept = budget(LABELS, index, per_class=3, seed=0)
    assert torch.bincount(LABELS[kept], minlength=4).tolist() == [3, 3, 3, 3]
    assert torch.equal(kept, budget(LABELS, index, per_class=3, seed=0))  # seeded
    assert len(budget(LABELS, index, per_class=100, seed=0)) == 100  # a budget above the data keeps it all


def make_source(n: int = 6):
    """A user's dataset: float grey N x H x W images and two class names."""
    return {"train": (torch.linspace(0, 1, n * 4).view(n, 2, 2), torch.arange(n) % 2)}, ["no", "yes"]


def test_a_user_source_becomes_uint8_images():
    data = OmegaConf.merge(packaged("data"), {"source": {"_target_": f"{__name__}.make_source", "n": 6}})
    sources, classes = user_source(data)
    images, labels = sources["train"]
    assert classes == ["no", "yes"]
    assert images.dtype == torch.uint8 and images.shape == (6, 1, 2, 2)
    assert images.min() == 0 and images.max() == 255
    assert labels.dtype == torch.long


def test_a_user_source_without_train_says_so():
    data = OmegaConf.merge(packaged("data"), {"source": {"_target_": "builtins.tuple", "_args_": [[{}, []]]}})
    with pytest.raises(UserError, match="no 'train' split"):
        user_source(data)


def test_normalized_float_equals_torchvisions_to_dtype_and_normalize():
    from torchvision.transforms import v2

    from shelltrain.data.transforms import NormalizedFloat

    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    fast = NormalizedFloat(mean, std)
    torch.testing.assert_close(fast(images[0]), reference(images[0]))  # one image
    torch.testing.assert_close(fast(images), reference(images))  # a batch
    floats = images.float() / 255
    torch.testing.assert_close(fast(floats), reference(floats))  # float input is normalized, not rescaled
    assert torch.equal(floats, images.float() / 255)  # and left untouched
