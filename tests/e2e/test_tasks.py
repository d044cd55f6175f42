"""task=evaluate, predict and export on a finished run, and their one-line errors."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, run_in_process, shelltrain_forked
from fixtures_data import make_imagefolder
from PIL import Image
from torch import nn

from shelltrain.errors import UserError
from shelltrain.export import export_metadata, export_model, run_exported
from shelltrain.models import SmallCNN
from shelltrain.schema import defaults, validate

# A tiny CNN trained briefly on digits; the splits and preprocessing are the default digits ones.
TRAIN = [
    "model=cnn",
    "model.width=8",
    "scheduler=none",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "trainer.epochs=2",
    "trainer.limit_train_batches=8",
]
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def needs_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f'{", ".join(missing)} not installed: pip install "shelltrain[export]"')


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("trained")
    return run_dir, run_in_process(run_dir, *TRAIN)


def test_evaluate_reproduces_the_runs_test_and_val_figures(trained, tmp_path):
    run_dir, trained_summary = trained
    test = run_in_process(tmp_path / "test", "task=evaluate", f"model.weights={run_dir}", "plots=true")
    assert test["task"] == "evaluate" and test["split"] == "test"
    for key in ("test_acc", "test_loss", "test_top5", "per_class"):
        assert test[key] == trained_summary[key], key  # exactly: same model, data, order and arithmetic
    assert Path(test["weights"]) == run_dir / "checkpoints" / "best.pt"
    assert (tmp_path / "test" / "plots" / "confusion_matrix.png").stat().st_size > 5_000

    best = run_dir / "checkpoints" / "best.pt"
    val = run_in_process(tmp_path / "val", "task=evaluate", "evaluate.split=val", f"model.weights={best}")
    assert val["val_acc"] == trained_summary["best_val_acc"]  # best.pt is the epoch that scored it
    train = run_in_process(tmp_path / "train", "task=evaluate", "evaluate.split=train", f"model.weights={run_dir}")
    assert sum(c["support"] for c in train["per_class"].values()) == 1293  # the whole train split, unaugmented


def test_evaluate_refuses_data_the_model_cannot_read(trained, tmp_path):
    run_dir, _ = trained
    with pytest.raises(UserError, match="set data.channels=1"):
        run_in_process(tmp_path / "rgb", "task=evaluate", f"model.weights={run_dir}", "data.channels=3")
    with pytest.raises(UserError, match="model's 10 classes .* differ from the data's 3"):
        run_in_process(
            tmp_path / "other",
            "task=evaluate",
            f"model.weights={run_dir}",
            "data=synthetic",
            "data.num_samples=60",
            "data.num_classes=3",
            "data.image_size=32",
        )
    with pytest.raises(UserError, match="has no checkpoints/best.pt"):
        run_in_process(tmp_path / "empty", "task=evaluate", f"model.weights={tmp_path}")


def test_predict_writes_one_row_per_image_with_the_models_own_answer(trained, tmp_path):
    run_dir, _ = trained
    from shelltrain.data import build_data
    from shelltrain.engine import predict
    from shelltrain.trained import open_trained

    cfg = compose_config()
    data = build_data(cfg.data, cfg.augmentation, seed=0)
    images = data.test.dataset.images[:12]  # uint8 1x32x32: PNGs of them decode to the same pixels
    folder = tmp_path / "images"
    for i, image in enumerate(images):
        (folder / f"group{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"group{i % 2}" / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")

    summary = run_in_process(tmp_path / "run", "task=predict", f"model.weights={run_dir}", f"predict.input={folder}")
    with open(tmp_path / "run" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert summary["images"] == len(rows) == 12 and set(rows[0]) == {"file", "class", "probability"}

    trained = open_trained(run_dir)
    model, checkpoint = trained.module, trained.checkpoint
    settings = defaults("trainer", epochs=0, device=torch.device("cpu"), channels_last=True)  # as the task's
    logits, _ = predict(model, data.test, settings, limit=1)
    expected = logits[:12].softmax(1).max(1)
    by_file = {r["file"]: r for r in rows}
    for i in range(12):
        row = by_file[f"group{i % 2}/{i:02d}.png"]
        assert row["class"] == checkpoint["classes"][expected.indices[i]]
        assert float(row["probability"]) == pytest.approx(expected.values[i].item(), abs=1e-5)


def test_export_torchscript_and_onnx_reproduce_the_logits(trained, tmp_path):
    run_dir, _ = trained
    ts = run_in_process(tmp_path / "ts", "task=export", "export.format=torchscript", f"model.weights={run_dir}")
    assert ts["max_abs_diff"] < 1e-4 and Path(ts["path"]).name == "model.torchscript.pt"
    assert export_metadata("torchscript", Path(ts["path"]))["classes"] == [str(d) for d in range(10)]

    needs_onnx()
    onnx = run_in_process(tmp_path / "onnx", "task=export", "export.format=onnx", f"model.weights={run_dir}")
    assert onnx["max_abs_diff"] < 1e-4 and Path(onnx["path"]).name == "model.onnx"
    meta = export_metadata("onnx", Path(onnx["path"]))
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["channels"] == 1


def test_export_folds_pruning_masks_into_the_weights(tmp_path):
    from torch.nn.utils import prune

    model = SmallCNN(10, 1, width=8).eval()
    prune.l1_unstructured(model.features[4], "weight", amount=0.5)
    assert hasattr(model.features[4], "weight_mask")
    images = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected = model(images)
    formats = ["torchscript"] + (["onnx"] if all(importlib.util.find_spec(n) for n in ONNX_PACKAGES) else [])
    for fmt in formats:
        path = tmp_path / f"pruned.{fmt}"
        exported = export_model(model, fmt, path, torch.randn(2, 1, 16, 16), {"classes": []})
        assert not hasattr(exported.features[4], "weight_mask") and hasattr(model.features[4], "weight_mask")
        assert (run_exported(fmt, path, images) - expected).abs().max() < 1e-4, fmt


def test_quantized_models_go_to_torchscript_and_not_onnx(tmp_path):
    import warnings

    model = SmallCNN(10, 1, width=8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    example = torch.randn(2, 1, 16, 16)
    with pytest.raises(UserError, match="onnx cannot take this quantized model.*use export.format=torchscript"):
        export_model(quantized, "onnx", tmp_path / "q.onnx", example, {})
    export_model(quantized, "torchscript", tmp_path / "q.pt", example, {})
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert (run_exported("torchscript", tmp_path / "q.pt", images) - quantized(images)).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task=evaluate"], "task=evaluate needs the trained model: add model.weights="),
        (["task=predict", "model.weights=x"], "task=predict needs images: add predict.input="),
        (["task=export", "model.weights=x", "export.format=tflite"], "export.format='tflite' is invalid"),
        (["task=evaluate", "model.weights=x", "evaluate.split=holdout"], "evaluate.split='holdout' is invalid"),
        (["task=fit"], "task='fit' is invalid; choose one of train, evaluate, predict, export"),
        (["logger=neptune"], "logger=neptune: no such option"),
        (["logger=[csv,tensorbord]"], "logger=tensorbord: no such option (did you mean 'tensorboard'?)"),
    ],
)
def test_task_and_logger_mistakes_are_one_line_errors(tmp_path, args, message):
    result = shelltrain_forked(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_only_tasks_that_read_the_dataset_need_its_root():
    for task in ("predict", "export"):  # they take the preprocessing from the checkpoint
        validate(compose_config("data=imagefolder", f"task={task}", "model.weights=run", "predict.input=images"))
    with pytest.raises(UserError, match="data.root: not set"):
        validate(compose_config("data=imagefolder", "task=evaluate", "model.weights=run"))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_on_a_full_disk_is_one_line_and_leaves_no_model_file(tmp_path, monkeypatch, fmt):
    """The exported file goes through a temporary name and a rename: a full disk leaves no truncated model."""
    import errno

    from shelltrain import rundir

    if fmt == "onnx":
        needs_onnx()

    def disk_full(tmp: Path, data: bytes) -> None:
        tmp.write_bytes(data[:100])  # part written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "_write_durably", disk_full)
    path = tmp_path / "run" / "model.out"
    with pytest.raises(
        UserError, match=r"cannot write '.*model\.out': No space left on device \(the disk .* is full\)"
    ):
        export_model(SmallCNN(10, 1, width=4).eval(), fmt, path, torch.randn(2, 1, 16, 16), {"classes": []})
    assert list((tmp_path / "run").iterdir()) == []


def test_evaluate_follows_the_checkpoints_preprocessing(tmp_path):
    """A run trained at a non-default image size is evaluated at that size without repeating data options;
    a size given on the command line on purpose wins and is said."""
    run_dir = tmp_path / "run16"
    trained = run_in_process(run_dir, *TRAIN, "data.image_size=16", "data.mean=[0.5]", "data.std=[0.25]")
    again = run_in_process(tmp_path / "eval", "task=evaluate", f"model.weights={run_dir}")
    assert again["test_acc"] == trained["test_acc"] and again["test_loss"] == trained["test_loss"]
    chosen = shelltrain_forked("task=evaluate", f"model.weights={run_dir}", "data.image_size=8", *FAST, cwd=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    assert "data.image_size=8 from the command line; the model was trained with 16" in chosen.stdout


def test_evaluate_follows_an_image_folder_runs_data_without_repeating_it(tmp_path, capsys):
    """An image-folder run (its own root, split seed and test fraction) is evaluated with only model.weights: the
    run's data config comes from its checkpoint, and its test figures come back exactly."""
    root = make_imagefolder(tmp_path / "images", per_class=12, size=(12, 12))
    data = [
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=12",
        "data.split_seed=3",
        "data.test_fraction=0.3",
    ]
    run_dir = tmp_path / "run"
    trained = run_in_process(run_dir, *TRAIN, *data, "data.batch_size=8")
    again = run_in_process(tmp_path / "eval", "task=evaluate", f"model.weights={run_dir}")
    assert again["test_acc"] == trained["test_acc"] and again["test_loss"] == trained["test_loss"]
    assert sum(c["support"] for c in again["per_class"].values()) == sum(
        c["support"] for c in trained["per_class"].values()
    )
    assert f"data: imagefolder (data.root={root}) as the run was trained on" in capsys.readouterr().out
