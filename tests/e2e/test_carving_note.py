"""An image folder without test/ (or val/) gives up train/ images to the carved split: the run says so at its start,
with the count and how to keep them in training, and says nothing when the folder has every split."""

from __future__ import annotations

from conftest import run_in_process
from fixtures_data import make_imagefolder

RUN = ["model=cnn", "model.width=4", "data=imagefolder", "data.image_size=16", "trainer.epochs=1"]


def test_a_folder_with_val_but_no_test_says_how_many_train_images_became_the_test_split(tmp_path):
    root = make_imagefolder(tmp_path / "pics", per_class=10, splits=("train", "val"), size=(16, 16))
    summary = run_in_process(tmp_path / "run", *RUN, f"data.root={root}")
    log = (tmp_path / "run" / "train.log").read_text()
    # 30 train/ images, ceil(0.2 * 30) = 6 carved: the summary's test figures come from those 6
    assert "data.root has no test/ folder: 6 of the images in train/ (data.test_fraction=0.2)" in log
    assert f"add {root}/test/" in log
    assert "no val/ folder" not in log
    assert summary["best_epoch"] == 1
    assert sum(1 for _ in open(tmp_path / "run" / "predictions.csv")) - 1 == 6  # 6 test images, one row each


def test_a_folder_with_every_split_carves_nothing_and_says_nothing(tmp_path):
    root = make_imagefolder(tmp_path / "pics", per_class=4, splits=("train", "val", "test"), size=(16, 16))
    run_in_process(tmp_path / "run", *RUN, f"data.root={root}")
    assert "has no test/ folder" not in (tmp_path / "run" / "train.log").read_text()
