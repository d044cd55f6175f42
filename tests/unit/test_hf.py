"""data=hf: a dataset written by save_to_disk (built here, tiny) trains, with its ClassLabel names as classes, its
splits as given or carved, and one-line errors for a wrong column, split or path."""

from __future__ import annotations

import pytest
from conftest import compose_config, run_in_process

from shelltrain.data import build_data
from shelltrain.errors import UserError

pytest.importorskip("datasets")
from hf_fixtures import HF, save  # noqa: E402 (after the skip: hf_fixtures imports datasets)


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
