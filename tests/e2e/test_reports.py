"""What a run leaves for people to look at: plots, loggers (csv, jsonl, TensorBoard), per-class metrics."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_in_process

from shelltrain.errors import UserError
from shelltrain.metrics import confusion_matrix, per_class_metrics, split_metrics, top_k_accuracy
from shelltrain.plots import plot_confusion_matrix, plot_curves, plot_members, plot_sweep, plot_tradeoff

# Two short epochs of a tiny CNN: enough for curves with two points and a real confusion matrix.
TINY = [
    "model=cnn",
    "model.width=8",
    "scheduler=none",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "trainer.epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking it is one and decodes."""
    from PIL import Image

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated file fails here
    return struct.unpack(">II", data[16:24])


def assert_picture(path: Path, min_bytes: int = 8_000) -> None:
    width, height = png_size(path)
    assert 300 <= width <= 2000 and 200 <= height <= 2000, (path, width, height)
    assert Path(path).stat().st_size >= min_bytes, f"{path} is suspiciously small: nothing drawn?"


def test_a_run_leaves_curves_confusion_matrix_and_per_class_metrics(tmp_path):
    summary = run_in_process(tmp_path, *TINY, "plots=true")
    assert_picture(tmp_path / "plots" / "curves.png", min_bytes=20_000)  # three panels of lines and text
    assert_picture(tmp_path / "plots" / "confusion_matrix.png")
    assert 0.0 <= summary["test_top5"] <= 1.0 and summary["test_top5"] >= summary["test_acc"]
    per_class = summary["per_class"]
    assert list(per_class) == [str(d) for d in range(10)]
    assert sum(c["support"] for c in per_class.values()) == 360  # the whole digits test split
    # accuracy is the support-weighted mean of the recalls
    weighted = sum(c["recall"] * c["support"] for c in per_class.values()) / 360
    assert weighted == pytest.approx(summary["test_acc"], abs=1e-6)
    with open(tmp_path / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]  # csv is the default logger


def test_loggers_csv_jsonl_and_tensorboard_at_once(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip('tensorboard is not installed: pip install "shelltrain[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run_in_process(tmp_path, *TINY, "logger=[csv,jsonl,tensorboard]")
    with open(tmp_path / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and {"train_loss", "val_acc", "lr"} <= set(rows[0])

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "acc/train", "acc/val", "lr", "summary/test_acc"} <= scalars
    assert [e.step for e in events.Scalars("acc/val")] == [1, 2]
    assert [e.value for e in events.Scalars("acc/val")] == pytest.approx([r["val_acc"] for r in rows])
    assert events.Scalars("summary/test_acc")[-1].value == pytest.approx(summary["test_acc"])
    assert "model:" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()  # add_text
    plugins = events.PluginTagToContent("hparams")
    assert set(plugins) >= {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}


def test_no_logger_and_a_single_other_logger(tmp_path):
    run_in_process(tmp_path / "none", *TINY, "trainer.epochs=1", "logger=[]")
    assert not (tmp_path / "none" / "metrics.csv").exists() and (tmp_path / "none" / "summary.json").exists()
    run_in_process(tmp_path / "jsonl", *TINY, "trainer.epochs=1", "logger=jsonl")
    assert not (tmp_path / "jsonl" / "metrics.csv").exists() and (tmp_path / "jsonl" / "metrics.jsonl").exists()
    assert not (tmp_path / "jsonl" / "plots").exists()  # plots=false (the tests' default) draws nothing


def test_a_users_logger_by_target(tmp_path):
    from shelltrain.loggers import build_loggers
    from shelltrain.schema import validate

    cfg = compose_config("+logger.mine._target_=shelltrain.loggers.JSONLLogger", "+logger.mine.filename=mine.jsonl")
    validate(cfg)
    loggers = build_loggers(cfg.logger, tmp_path)
    assert [type(x).__name__ for x in loggers.callbacks] == ["CSVLogger", "JSONLLogger"]
    loggers.on_epoch_end(None, {"epoch": 1, "val_acc": float("nan")}, improved=False)
    assert json.loads((tmp_path / "mine.jsonl").read_text()) == {"epoch": 1, "val_acc": None}
    with pytest.raises(UserError, match="logger.neptune is not a logger"):
        validate(compose_config("+logger.neptune.project=x"))


def test_per_class_metrics_match_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support

    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (200,), generator=generator)
    logits = torch.randn(200, 4, generator=generator) + 2 * torch.nn.functional.one_hot(targets, 4)
    logits[:, 3] -= 10  # class 3 is never predicted: its precision is 0, not NaN
    per_class = per_class_metrics(confusion_matrix(logits, targets, 4), ["a", "b", "c", "d"])
    expected = precision_recall_fscore_support(targets, logits.argmax(1), labels=range(4), zero_division=0)
    for i, name in enumerate("abcd"):
        got = per_class[name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(tuple(float(e[i]) for e in expected[:3]))
        assert got["support"] == int(expected[3][i])
    assert per_class["d"]["precision"] == 0.0


def test_top5_only_with_more_than_five_classes():
    from shelltrain.schema import defaults

    settings = defaults("trainer", epochs=0, device=torch.device("cpu"))
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]])  # class 0 ranks 1st, then 6th
    assert top_k_accuracy(logits, torch.tensor([0, 0]), 5) == 0.5
    assert split_metrics(logits, torch.tensor([0, 0]), settings, "test")["test_top5"] == 0.5
    assert "test_top5" not in split_metrics(logits[:, :5], torch.tensor([0, 0]), settings, "test")


def test_stage_plots_from_hand_made_rows(tmp_path):
    prune_rows = [
        {"label": "baseline", "sparsity": 0.0, "test_acc": 0.981, "latency_ms": 12.0, "macs": 37.2e6},
        {"label": "step 1", "sparsity": 0.5, "test_acc": 0.975, "latency_ms": 7.5, "macs": 19.0e6},
        {"label": "step 2", "sparsity": 0.75, "test_acc": 0.94, "latency_ms": 4.1, "macs": 9.9e6},
    ]
    assert_picture(plot_tradeoff(prune_rows, tmp_path / "prune_tradeoff.png"))
    assert_picture(plot_tradeoff([{"macs": 1e6, "test_acc": 0.9}], tmp_path / "macs.png", x="macs"), min_bytes=5_000)
    members = [{"name": f"member {i}", "test_acc": 0.95 + i / 200} for i in range(3)]
    assert_picture(plot_members([*members, {"name": "ensemble (soft vote)", "test_acc": 0.972}], tmp_path / "m.png"))
    sweep_rows = [  # summary.csv rows: strings, and a failed job without a metric
        {"optimizer": opt, "optimizer.lr": lr, "test_acc": str(0.9 + float(lr)), "status": "completed"}
        for opt in ("sgd", "adam")
        for lr in ("0.001", "0.01", "0.1")
    ] + [{"optimizer": "adam", "optimizer.lr": "1.0", "test_acc": "", "status": "failed"}]
    assert_picture(plot_sweep(sweep_rows, tmp_path / "sweep" / "plots" / "sweep.png", ["optimizer", "optimizer.lr"]))


def test_curves_of_one_epoch_and_a_hundred_class_confusion_matrix(tmp_path):
    row = {"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "train_acc": 0.3, "val_acc": 0.28, "lr": 0.1}
    assert_picture(plot_curves([row], tmp_path / "one.png", best_epoch=1))
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 100, (2000,), generator=generator)
    confusion = confusion_matrix(torch.randn(2000, 100, generator=generator), targets, 100)
    width, height = png_size(plot_confusion_matrix(confusion, [f"c{i}" for i in range(100)], tmp_path / "cm.png"))
    assert width <= 2000 and height <= 2000
