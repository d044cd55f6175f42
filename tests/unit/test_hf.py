"""data=hf: a dataset written by save_to_disk (built here, tiny) trains, with its ClassLabel names as classes, its
splits as given or carved, and one-line errors for a wrong column, split or path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_config, run_in_process
from PIL import Image

from shelltrain.data import build_data
from shelltrain.errors import UserError

datasets = pytest.importorskip("datasets")


def _pictures(count: int, offset: int = 0) -> tuple[list[Image.Image], list[int]]:
    """Grey 10x12 images whose brightness says the class (0: dark, 1: light), with an id in pixel (0, 0)."""
    labels = [i % 2 for i in range(count)]
    images = []
    for i, y in enumerate(labels):
        pixels = np.full((12, 10), 50 + 150 * y, dtype=np.uint8)
        pixels[0, 0] = offset + i
        images.append(Image.fromarray(pixels, "L"))
    return images, labels


def save(folder, splits=("train", "validation", "test"), counts=(40, 10, 10)):
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["dark", "light"])})
    parts = {}
    for n, (split, count) in enumerate(zip(splits, counts)):
        images, labels = _pictures(count, offset=100 * n)
        parts[split] = datasets.Dataset.from_dict({"img": images, "kind": labels}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


HF = ["data=hf", "data.hf.image_column=img", "data.hf.label_column=kind", "data.image_size=8", "data.num_workers=0"]


def test_a_saved_dataset_dict_gives_its_splits_and_class_names(tmp_path):
    data = compose_config(*HF, f"data.hf.path={save(tmp_path / 'ds')}").data
    bundle = build_data(data, compose_config("augmentation=none").augmentation, seed=0)
    assert bundle.classes == ["dark", "light"] and bundle.in_channels == 1
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [40, 10, 10]
    images, labels = next(iter(bundle.test))
    assert images.shape == (10, 1, 8, 8)
    bright = (images.flatten(1).mean(1) > images.mean()).long()  # light images are the class-1 ones
    assert bright.tolist() == labels.tolist()


def test_a_dataset_without_val_and_test_has_them_carved(tmp_path):
    folder = save(tmp_path / "ds", splits=("train",), counts=(50,))
    data = compose_config(*HF, f"data.hf.path={folder}").data
    bundle = build_data(data, compose_config("augmentation=none").augmentation, seed=0)
    assert [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)] == [36, 4, 10]


def test_an_hf_dataset_trains_end_to_end(tmp_path):
    folder = save(tmp_path / "ds")
    summary = run_in_process(tmp_path / "run", *HF, f"data.hf.path={folder}", "model=cnn", "trainer.epochs=3")
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.9  # brightness separates the two classes


@pytest.mark.parametrize(
    "setting, message",
    [
        ("data.hf.label_column=nope", "data.hf.label_column: 'nope' is not a column of the train split"),
        ("data.hf.train_split=fit", "data.hf.train_split: 'fit' is not a split of the dataset"),
        ("data.hf.path={}/missing", "data.hf.path: '.*missing' is not a dataset written by save_to_disk"),
        ("data.cache=memory", "data.cache=memory does not apply to data=hf"),
    ],
)
def test_bad_hf_settings_are_one_line_naming_the_key(tmp_path, setting, message):
    folder = save(tmp_path / "ds", counts=(6, 2, 2))
    data = compose_config(*HF, f"data.hf.path={folder}", setting.format(tmp_path)).data
    with pytest.raises(UserError, match=message) as error:
        build_data(data, compose_config("augmentation=none").augmentation, seed=0)
    assert "\n" not in str(error.value)
