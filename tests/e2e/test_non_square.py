"""Non-square input end to end: a model trained at data.image_size=[H, W] is evaluated, predicts and exports at
H x W (the checkpoint records the size); an image folder cached and augmented on the device at [H, W] with
five-crop TTA; a bad size is one line naming data.image_size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_in_process, shelltrain_forked
from fixtures_data import make_imagefolder
from PIL import Image
from test_tasks import needs_onnx

TINY = ["model=cnn", "model.width=4", "trainer.epochs=1"]


def test_a_model_trained_at_height_and_width_evaluates_predicts_and_exports_at_it(tmp_path):
    run = tmp_path / "run"
    trained = run_in_process(run, *TINY, "data.image_size=[16,24]", "data.limit_samples=300", "plots=true")
    checkpoint = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert checkpoint["preprocessing"]["image_size"] == [16, 24]
    assert "preprocessing: 16x24 px (data.image_size" in (run / "train.log").read_text()
    assert "images 16x24 px (height x width)" in (run / "MODEL_CARD.md").read_text()
    assert (run / "plots" / "top_losses.png").stat().st_size > 0  # the gallery tiles 16x24 pictures

    evaluated = run_in_process(tmp_path / "evaluate", "task=evaluate", f"model.weights={run}")
    assert evaluated["test_acc"] == trained["test_acc"]  # the same images at the same size, from the checkpoint alone

    folder = tmp_path / "images"
    folder.mkdir()
    for i, (width, height) in enumerate([(30, 20), (20, 30), (24, 16), (8, 8)]):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    run_in_process(tmp_path / "predict", "task=predict", f"model.weights={run}", f"predict.input={folder}")
    with open(tmp_path / "predict" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(row["class"] in [str(c) for c in range(10)] for row in rows)

    needs_onnx()
    import onnxruntime

    exported = run_in_process(tmp_path / "export", "task=export", "export.format=onnx", f"model.weights={run}")
    session = onnxruntime.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 16, 24]
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 1, 16, 24), dtype=np.float32)})[0]
    assert logits.shape == (1, 10)
    meta = json.loads(session.get_modelmeta().custom_metadata_map["shelltrain"])
    assert meta["preprocessing"]["image_size"] == [16, 24] and "[height, width]" in meta["preprocessing"]["resize"]


def test_a_cached_folder_augmented_on_the_device_and_tested_with_five_crops_at_height_and_width(tmp_path):
    root = make_imagefolder(tmp_path / "images", per_class=8, splits=("train", "test"), size=(40, 30))
    cache = tmp_path / "cache"
    summary = run_in_process(
        tmp_path / "run",
        *TINY,
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=[12,20]",
        "data.batch_size=8",
        "data.cache=memory",
        f"data.cache_dir={cache}",
        "data.on_device=true",
        "augmentation=basic",  # RandomCrop to ${data.image_size} with padding, and a flip
        "trainer.test_tta=five_crop",
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert "has no batched form" not in log  # the crop to [12, 20] ran on the device, not in loader workers
    assert "preprocessing: 12x20 px" in log
    assert summary["test_tta"] == "five_crop" and 0 <= summary["test_acc_tta"] <= 1
    arrays = [np.load(path, mmap_mode="r") for path in sorted(cache.glob("*.npy"))]
    assert [a.shape for a in arrays] == [(24, 3, 12, 20)] * 2  # train/ and test/, 40x30 PNGs made 20 wide, 12 high


@pytest.mark.parametrize(
    "value, says",
    [
        ("[0,8]", "data.image_size=[0, 8] is out of range; it must be >= 1"),
        ("[8]", "data.image_size=[8] gives one side"),
        ("a", "data.image_size='a' is not an image size"),
    ],
)
def test_a_bad_image_size_is_one_line_naming_the_key(tmp_path, value, says):
    result = shelltrain_forked(*TINY, f"data.image_size={value}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"shelltrain: error: {says}"), result.stderr
    assert "[height, width]" in lines[0]
    assert list(Path(tmp_path).iterdir()) == []  # refused before any run directory was made
