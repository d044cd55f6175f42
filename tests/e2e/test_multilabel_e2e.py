"""Multi-label end to end (trainer.loss=bce): a manifest whose label cells hold several `|`-joined labels trains,
tunes per-class thresholds on val and stores them with the model; evaluate, predict and export use those
thresholds, and the exported ONNX file run by onnxruntime picks the same labels as task=predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import run_in_process
from PIL import Image
from test_scale import DDP, failure, torchrun

from shelltrain.cam import FOLDER as CAM_FOLDER
from shelltrain.checkpoint import load_checkpoint
from shelltrain.export import export_metadata
from shelltrain.trained import open_trained

SHAPES = ("red", "green", "blue")  # class k: a bright square in channel k, in its own corner of the image


def make_multilabel_manifest(folder, count: int = 90, seed: int = 0):
    """`count` 16x16 RGB images, each carrying one to three of the SHAPES (a random non-empty subset), listed in
    labels.csv as `red|blue`; the images of the last 10 rows are also copied to folder/new for task=predict."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "new").mkdir()
    rows = []
    for i in range(count):
        subset = [k for k in range(3) if rng.random() < 0.5] or [int(rng.integers(3))]
        pixels = rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
        for k in subset:
            y, x = (0, 0) if k == 0 else (0, 8) if k == 1 else (8, 4)
            pixels[y : y + 8, x : x + 8, k] = 230
        image = Image.fromarray(pixels)
        image.save(folder / "images" / f"{i}.png")
        if i >= count - 10:
            image.save(folder / "new" / f"{i}.png")
        rows.append({"path": f"images/{i}.png", "label": "|".join(SHAPES[k] for k in subset)})
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv", rows


DATA = ("data=manifest", "data.image_size=16", "data.batch_size=16", "model=cnn", "model.width=8")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multilabel")
    manifest, rows = make_multilabel_manifest(folder)
    run = folder / "run"
    result = run_in_process(
        run,
        *DATA,
        f"data.manifest={manifest}",
        "trainer.loss=bce",
        "trainer.monitor=val_map",
        "trainer.pos_weight=balanced",
        "trainer.label_smoothing=0.05",
        "trainer.epochs=6",
        "optimizer=adam",
        "optimizer.lr=0.01",
        "scheduler=none",
    )
    return folder, run, result


def test_training_reports_multilabel_figures_and_stores_thresholds(trained_run):
    folder, run, result = trained_run
    for key in ("test_map", "test_f1_micro", "test_f1_macro", "test_precision", "test_recall", "best_val_map"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["test_map"] > 0.8  # three bright squares: a tiny CNN finds them in a few epochs
    assert set(result["per_class"]) == set(SHAPES) and set(result["per_class"]["red"]) >= {"ap", "threshold", "f1"}
    stored = load_checkpoint(run / "checkpoints" / "best.pt")["thresholds"]
    assert stored == [result["thresholds"][name] for name in sorted(SHAPES)]  # classes: the labels sorted
    assert open_trained(run).thresholds == stored
    header = (run / "predictions.csv").read_text().splitlines()[0]
    assert header == "sample,true,predicted,scores,exact,split"
    with open(run / "metrics.csv", newline="") as handle:
        epochs = list(csv.DictReader(handle))
    assert len(epochs) == 6 and all(0.0 <= float(row["val_map"]) <= 1.0 for row in epochs)
    card = (run / "MODEL_CARD.md").read_text()
    assert "Multi-label image classification over 3 classes" in card and "| test mAP |" in card


def test_evaluate_predict_and_export_agree_on_labels(trained_run, tmp_path):
    folder, run, result = trained_run
    evaluated = run_in_process(tmp_path / "evaluate", "task=evaluate", f"model.weights={run}")
    assert evaluated["test_map"] == pytest.approx(result["test_map"], abs=1e-6)  # the run's own test split
    assert evaluated["test_f1_micro"] == pytest.approx(result["test_f1_micro"], abs=1e-6)
    new = f"predict.input={folder / 'new'}"
    run_in_process(tmp_path / "predict", "task=predict", f"model.weights={run}", new, "predict.cam=true")
    assert len(list((tmp_path / "predict" / CAM_FOLDER).glob("*.png"))) == 10  # the most probable label's CAM
    with open(tmp_path / "predict" / "predictions.csv") as handle:
        predicted = {row["file"]: row["labels"] for row in csv.DictReader(handle)}
    assert len(predicted) == 10
    run_in_process(tmp_path / "export", "task=export", f"model.weights={run}", "export.format=onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = tmp_path / "export" / "model.onnx"
    metadata = export_metadata("onnx", model)
    assert metadata["multi_label"] is True and metadata["thresholds"] == open_trained(run).thresholds
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    mean, std = (torch.tensor(metadata["preprocessing"][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    for name, labels in predicted.items():
        pixels = torch.from_numpy(np.asarray(Image.open(folder / "new" / name).convert("RGB"))).permute(2, 0, 1)
        batch = ((pixels[None].float() / 255 - mean) / std).numpy()
        probabilities = 1 / (1 + np.exp(-session.run(None, {"images": batch})[0][0]))
        chosen = [c for c, p, t in zip(metadata["classes"], probabilities, metadata["thresholds"]) if p >= t]
        assert "|".join(chosen) == labels, name
    summary = json.loads((tmp_path / "predict" / "summary.json").read_text())
    assert sum(summary["predicted_counts"].values()) == sum(len(v.split("|")) for v in predicted.values() if v)


@pytest.mark.slow  # two ensemble members and two folds: about 45 s on two cores
def test_an_ensemble_fuses_probabilities_and_cv_folds_stratify_multi_hot_rows(trained_run, tmp_path):
    folder = trained_run[0]
    common = (*DATA, f"data.manifest={folder / 'labels.csv'}", "trainer.loss=bce", "trainer.epochs=2")
    ensemble = run_in_process(tmp_path / "ensemble", *common, "ensemble=average", "ensemble.members=2")
    report = json.loads((tmp_path / "ensemble" / "ensemble.json").read_text())
    opened = open_trained(tmp_path / "ensemble")
    assert opened.kind == "ensemble" and opened.thresholds == report["thresholds"]
    assert list(ensemble["thresholds"].values()) == report["thresholds"] and 0 <= ensemble["test_map"] <= 1
    images = torch.rand(4, 3, 16, 16)
    members = torch.stack([m.module(images).sigmoid() for m in opened.members]).mean(0)
    assert torch.allclose(opened.module(images).sigmoid(), members, atol=1e-5)  # the average of probabilities
    folds = run_in_process(tmp_path / "cv", *common, "cv.folds=2", "cv.refit=false")
    assert folds["cv"]["folds"] == 2 and "test_map" in json.loads((tmp_path / "cv/cv/fold_1/summary.json").read_text())


@pytest.mark.slow  # about 25 s: two torchrun ranks
def test_ddp_validation_measures_map_on_the_whole_val_split(tmp_path):
    """Under DDP each rank predicts its shard of val; mAP needs every score, so the ranks' logits are gathered:
    the epoch's val_map is what one process measures on the whole val split with the same weights."""
    args = (*DDP, "trainer.loss=bce", "trainer.monitor=val_map", "trainer.epochs=1")
    result = torchrun(*args, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, failure(result)
    trained = json.loads((tmp_path / "run/summary.json").read_text())
    evaluated = run_in_process(
        tmp_path / "val", "task=evaluate", "evaluate.split=val", f"model.weights={tmp_path / 'run'}"
    )
    assert trained["best_val_map"] == pytest.approx(evaluated["val_map"], abs=1e-6)


@pytest.mark.slow  # about 15 s more: prune, fine-tune, measure
def test_a_pruned_multilabel_model_is_fine_tuned_with_bce_and_gets_new_thresholds(trained_run, tmp_path):
    folder, run, result = trained_run
    pruned = run_in_process(
        tmp_path / "pruned",
        *DATA,
        f"data.manifest={folder / 'labels.csv'}",
        "trainer.loss=bce",
        f"model.weights={run}",
        "trainer.epochs=0",
        "prune=magnitude",
        "prune.finetune_epochs=1",
    )
    assert pruned["prune_sparsity"] > 0.3 and 0 <= pruned["test_map"] <= 1
    assert load_checkpoint(tmp_path / "pruned/checkpoints/best.pt")["thresholds"] == list(pruned["thresholds"].values())
