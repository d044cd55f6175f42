"""Training recipes (docs/recipes.md): EMA of the weights through a whole run, resumed mid-run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at_step, run_in_process

from shelltrain.errors import Interrupted

# Three short epochs of a tiny model, reproducible to the bit: the runs the EMA and SWA tests compare.
SHORT = [
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "trainer.deterministic=true",
    "trainer.epochs=3",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.threads=1",
    "plots=false",
]
EMA = [*SHORT, "model.dropout=0.2", "augmentation=seed", "trainer.ema.decay=0.7", "trainer.monitor=ema_val_loss"]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in {"seconds", "images_per_second"}} for row in rows]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return _untimed(list(csv.DictReader(f)))


def _straight_and_resumed(tmp_path: Path, monkeypatch, args: list[str], stop_after: int) -> tuple[Path, Path, int]:
    """The run uninterrupted, and the same run stopped by SIGINT after `stop_after` optimizer steps (the engine
    saves a mid-epoch checkpoint), then resumed; returns both run directories and the batch it stopped after."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_in_process(straight, *args)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, stop_after, "sigint")
        with pytest.raises(Interrupted):
            run_in_process(resumed, *args)
    stopped = torch.load(resumed / "checkpoints/last.pt", weights_only=True)["train_state"]["batch"]
    run_in_process(resumed, *args, f"trainer.resume={resumed}")
    return straight, resumed, stopped


def test_ema_run_reports_both_models_and_resumes_exactly(tmp_path, monkeypatch):
    straight, resumed, stopped = _straight_and_resumed(tmp_path, monkeypatch, EMA, stop_after=6)
    assert stopped == 2  # mid-epoch 2

    a, b = (torch.load(d / "checkpoints/last.pt", weights_only=True) for d in (straight, resumed))
    assert a["ema"]["n_averaged"].item() == 12  # one update per optimizer step
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert _rows(straight) == _rows(resumed)
    history = a["train_state"]["history"]  # the epoch rows (metrics.csv keeps its fixed columns)
    assert {"ema_val_acc", "ema_val_loss", "val_acc"} <= set(history[0])
    assert _untimed(history) == _untimed(b["train_state"]["history"])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, resumed))
    assert sa["ema_test_acc"] == sb["ema_test_acc"] and sa["test_acc"] == sb["test_acc"]
    best = torch.load(straight / "checkpoints/best.pt", weights_only=True)
    for key, value in best["model"].items():  # monitor=ema_val_loss: best.pt's model is the averaged one
        assert torch.equal(value, best["ema"][f"module.{key}"]), key
    assert sa["best_ema_val_loss"] == min(r["ema_val_loss"] for r in history)


TINY = [
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "trainer.epochs=2",
    "trainer.threads=1",
    "trainer.limit_train_batches=10",
    "plots=false",
]


def test_calibration_lowers_ece_of_an_over_confident_model_and_travels_with_the_checkpoint(tmp_path):
    from conftest import compose_config

    from shelltrain.calibration import Tempered, calibrate
    from shelltrain.data import build_data
    from shelltrain.engine import evaluate, predict
    from shelltrain.runner import train_settings
    from shelltrain.trained import open_trained

    trained = tmp_path / "trained"
    run_in_process(trained, *TINY)
    opened = open_trained(trained)
    model, checkpoint = opened.module, opened.checkpoint
    assert "temperature" not in checkpoint and not isinstance(model, Tempered)  # calibrate=none stores nothing
    cfg = compose_config(*TINY)
    data = build_data(cfg.data, cfg.augmentation, 0, False)
    settings = train_settings(cfg.trainer, torch.device("cpu"))
    over_confident = Tempered(model, 0.1)  # logits x 10
    tested = predict(over_confident, data.test, settings)
    section = calibrate("temperature", over_confident, data, settings, trained, tested)["calibration"]
    assert section["val_ece_after"] < section["val_ece_before"] and section["temperature"] > 1.0
    opened = open_trained(trained)  # stored in best.pt (and last.pt)
    calibrated, checkpoint = opened.module, opened.checkpoint
    assert checkpoint["temperature"] == section["temperature"] and isinstance(calibrated, Tempered)
    tempered = Tempered(over_confident, section["temperature"])
    assert evaluate(tempered, data.val, settings)["acc"] == evaluate(over_confident, data.val, settings)["acc"]


def test_calibrate_in_a_run_reports_before_and_after_and_evaluate_applies_it(tmp_path):
    summary = run_in_process(tmp_path / "run", *TINY, "trainer.calibrate=temperature")
    section = summary["calibration"]
    assert section["val_nll_after"] <= section["val_nll_before"] + 1e-6  # T minimises the val NLL
    assert math.isclose(section["test_ece_before"], summary["test_ece"], abs_tol=1e-9)
    evaluated = run_in_process(tmp_path / "eval", "task=evaluate", f"model.weights={tmp_path / 'run'}")
    assert math.isclose(evaluated["test_ece"], section["test_ece_after"], abs_tol=1e-6)
    assert evaluated["test_acc"] == summary["test_acc"]
    plain = tmp_path / "plain"
    run_in_process(plain, *TINY, "trainer.seed=1")
    fuse = ["ensemble=average", f"ensemble.checkpoints=[{tmp_path / 'run'},{plain}]", "trainer.epochs=0"]
    run_in_process(tmp_path / "ensemble", *TINY, *fuse)
    members = json.loads((tmp_path / "ensemble/ensemble.json").read_text())["members"]
    assert math.isclose(members[0]["val_loss"], section["val_nll_after"], rel_tol=1e-5)  # its own temperature
    assert math.isclose(
        members[1]["val_loss"],
        run_in_process(tmp_path / "p", "task=evaluate", "evaluate.split=val", f"model.weights={plain}")["val_nll"],
        rel_tol=1e-5,
    )


SWA = [*SHORT, "trainer.swa.start_epoch=2", "trainer.swa.lr=0.02"]


def test_swa_averages_the_epochs_from_its_start_and_recomputes_batchnorm(tmp_path, monkeypatch):
    from shelltrain import averaging

    recomputed = []
    real_update_bn = averaging.update_bn

    def update_bn(loader, model, device=None):
        before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
        real_update_bn(loader, model, device=device)
        recomputed.append(all(not torch.equal(before[k], model.state_dict()[k]) for k in before) and bool(before))

    monkeypatch.setattr(averaging, "update_bn", update_bn)
    run_dir = tmp_path / "swa"
    summary = run_in_process(run_dir, *SWA, "trainer.keep_checkpoints=3")
    epochs = {e: torch.load(run_dir / f"checkpoints/epoch_{e:03d}.pt", weights_only=True) for e in (1, 2, 3)}
    swa = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["swa"]
    assert swa["n_averaged"].item() == 2
    params = [k for k, v in epochs[3]["model"].items() if v.is_floating_point() and "running" not in k]
    for key in params:  # by hand: the mean of epochs 2 and 3, not 1
        expected = (epochs[2]["model"][key] + epochs[3]["model"][key]) / 2
        assert torch.allclose(swa[f"module.{key}"], expected, atol=1e-6), key
    assert [row["lr"] for row in epochs[3]["train_state"]["history"]][1:] == [0.02, 0.02]  # SWALR's constant rate
    assert recomputed == [True] and {"swa_test_acc", "swa_test_loss"} <= set(summary)
    assert summary["swa_epochs_averaged"] == 2


def test_swa_resumes_exactly(tmp_path, monkeypatch):
    straight, resumed, stopped = _straight_and_resumed(tmp_path, monkeypatch, SWA, stop_after=10)
    assert stopped > 0  # mid-epoch 3, after one averaged epoch
    a, b = (torch.load(d / "checkpoints/last.pt", weights_only=True) for d in (straight, resumed))
    for key in a["swa"]:
        assert torch.equal(a["swa"][key], b["swa"][key]), key
    assert _rows(straight) == _rows(resumed)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, resumed))
    assert sa["swa_test_acc"] == sb["swa_test_acc"]


def test_profile_writes_a_chrome_trace_and_prints_the_top_operators(tmp_path, capsys):
    run_dir = tmp_path / "profiled"
    run_in_process(run_dir, *TINY, "trainer.epochs=1", "trainer.limit_train_batches=6", "trainer.profile=true")
    trace = json.loads((run_dir / "profile_trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::convolution" in names or "aten::mkldnn_convolution" in names
    out = capsys.readouterr().out
    table = out[out.index("top operators by self CPU time") :]
    assert "Self CPU" in table and "aten::" in table
