"""MODEL_CARD.md: written at the end of a training run from the run's own figures, in the hub's format."""

from __future__ import annotations

import yaml
from conftest import run_in_process

TRAIN = ["data=synthetic", "data.num_samples=120", "data.num_classes=5", "data.image_size=16"]
TRAIN += ["model=cnn", "model.width=4", "trainer.epochs=1", "trainer.calibrate=temperature"]


def test_model_card_names_the_runs_own_figures(tmp_path):
    result = run_in_process(tmp_path, *TRAIN)
    text = (tmp_path / "MODEL_CARD.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "pytorch" and "image-classification" in meta["tags"]
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "accuracy" and metric["value"] == round(result["test_acc"], 4)

    assert f"| test accuracy | {result['test_acc']:.4f} |" in body
    assert f"cnn, {result['params']:,} parameters" in body
    test_images = sum(c["support"] for c in result["per_class"].values())
    assert f"| test | {test_images:,} |" in body  # the split sizes are the run's
    weakest = sorted(result["per_class"].items(), key=lambda item: item[1]["recall"])[:3]
    for name, figures in weakest:
        assert f"| {name} | {figures['recall']:.4f} |" in body
    calibration = result["calibration"]
    assert f"T = {calibration['temperature']:.4f}" in body
    assert "One seed (trainer.seed=0)" in body and "| seed | 0 |" in body
    assert body.count("<!-- FILL IN") == 2  # intended use and limitations are the user's
    assert "## Pruning" not in body  # a section the run did not make is left out
