"""The trained model as every consumer opens it (shelltrain.trained): a run's averaged weights as models of their
own, ensemble members trained at another image size, and a teacher that must stay on the CPU."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import run_in_process
from torch import nn

from shelltrain.errors import UserError
from shelltrain.fusion import FusedModel
from shelltrain.placement import Relocated, place_frozen
from shelltrain.preprocess import InputAdapter, Preprocessing
from shelltrain.schema import defaults
from shelltrain.trained import open_trained, resolve

SMALL = ["model=cnn", "model.width=8", "data.image_size=16", "trainer.threads=1", "scheduler=none", "optimizer=adam"]


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """A run that keeps EMA and SWA weights beside best.pt."""
    run = tmp_path_factory.mktemp("averaged") / "run"
    averages = ["trainer.ema.decay=0.9", "trainer.swa.start_epoch=2", "trainer.swa.lr=0.001"]
    summary = run_in_process(run, *SMALL, "optimizer.lr=0.01", "trainer.epochs=3", *averages)
    return run, summary


def test_ema_and_swa_weights_evaluate_export_and_finetune(averaged, tmp_path):
    run, summary = averaged
    assert summary["ema_test_acc"] > 0.5 and summary["swa_test_acc"] > 0.5  # chance is 0.1
    for weights in ("ema", "swa"):
        evaluated = run_in_process(tmp_path / f"evaluate-{weights}", "task=evaluate", f"model.weights={run}@{weights}")
        assert evaluated["weights"].endswith(f"checkpoints/{weights}.pt")
        assert evaluated["test_acc"] == pytest.approx(summary[f"{weights}_test_acc"], abs=1e-6)
    exported = run_in_process(
        tmp_path / "export", "task=export", f"model.weights={run}@swa", "export.format=torchscript"
    )
    assert exported["max_abs_diff"] <= 1e-4
    tuned = run_in_process(tmp_path / "finetune", *SMALL, "trainer.epochs=1", f"model.weights={run}@ema")
    loaded = tuned["transfer"]
    assert loaded["loaded"] == loaded["total"] and not loaded["missing"] and not loaded["unexpected"]
    assert tuned["test_acc"] > 0.5


def test_a_run_without_averaged_weights_says_how_to_get_them(averaged, tmp_path):
    run, _ = averaged
    plain = tmp_path / "plain"
    run_in_process(plain, *SMALL, "debug=smoke")
    with pytest.raises(UserError, match=r"has no ema weights \(ema.pt\): it was trained without trainer.ema.decay"):
        resolve(f"{plain}@ema", "model.weights")
    assert resolve(f"{run}@last", "model.weights") == (run / "checkpoints/last.pt", "last")


def test_a_sweeps_top_k_trained_at_another_image_size_reaches_the_members_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    for job, seed in (("0", 0), ("1", 1)):  # what a multirun directory holds: one run directory per job
        run_in_process(sweep / job, *SMALL, "optimizer.lr=0.01", "trainer.epochs=3", f"trainer.seed={seed}")
    members = [json.loads((sweep / job / "summary.json").read_text())["test_acc"] for job in ("0", "1")]
    assert min(members) > 0.8
    fused = run_in_process(  # this run's data is 32 px; the members were trained at 16 px
        tmp_path / "fused",
        "model=cnn",
        "trainer.threads=1",
        "trainer.epochs=0",
        "ensemble=average",
        f"ensemble.sweep={sweep}",
        "ensemble.top_k=2",
    )
    report = json.loads((tmp_path / "fused" / "ensemble.json").read_text())
    for member, alone in zip(report["members"], sorted(members, reverse=True)):
        assert member["test_acc"] == pytest.approx(alone, abs=0.03)  # each as good as in its own run
    assert fused["test_acc"] >= min(members) - 0.01


def test_an_int8_teacher_stays_on_the_cpu_when_the_run_trains_elsewhere():
    float_model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    int8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), {nn.Linear})
    settings = replace(defaults("trainer"), device=torch.device("meta"), channels_last=False)
    teacher = place_frozen(int8, settings)
    assert isinstance(teacher, Relocated) and teacher.device == torch.device("cpu")
    assert teacher(torch.randn(2, 1, 4, 4)).shape == (2, 4)  # still runs: on the CPU, where int8 kernels are
    placed = place_frozen(float_model, settings)
    assert placed is float_model and next(placed.parameters()).device.type == "meta"


def test_a_weighted_fused_teacher_stays_finite_under_fp16_autocast():
    class Confident(nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :5] * self.scale  # probabilities far below fp16's 6e-8

    fused = FusedModel([Confident(40.0), Confident(-40.0)], "weighted", [0.3, 0.7])
    x = torch.randn(8, 1, 4, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        out = fused(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    plain = fused(x)
    assert torch.allclose(out, plain)


def test_an_input_adapter_brings_a_batch_to_the_models_preprocessing():
    given = Preprocessing(32, 1, (0.5,), (0.25,))
    wanted = Preprocessing(16, 1, (0.1,), (0.2,))
    seen = {}

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["x"] = x
            return x.flatten(1)

    raw = torch.rand(3, 1, 32, 32)
    InputAdapter(Spy(), given, wanted)((raw - 0.5) / 0.25)
    expected = (nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", antialias=True) - 0.1) / 0.2
    assert seen["x"].shape == (3, 1, 16, 16) and torch.allclose(seen["x"], expected, atol=1e-5)
    assert not wanted.same_inputs(given) and wanted.same_inputs(Preprocessing(16, 1, (0.1,), (0.2,)))


def test_open_trained_reads_the_whole_preprocessing(averaged):
    run, _ = averaged
    trained = open_trained(run)
    assert trained.weights == "best" and trained.kind == "model" and not trained.quantized
    assert trained.preprocessing.image_size == (16, 16) and trained.preprocessing.channels == 1
    assert trained.preprocessing.interpolation == "bilinear" and trained.preprocessing.antialias


def test_a_partial_load_is_an_error_unless_strict_is_off(averaged, tmp_path, capsys):
    """The raw state of torch's AveragedModel (prefixed `module.`, plus `n_averaged`) fits only partly: an error by
    default; with model.strict=false what fits loads and the count is printed."""
    run, _ = averaged
    raw = torch.load(run / "checkpoints/last.pt", weights_only=True)["swa"]
    raw["n_averaged"] = raw["n_averaged"].reshape(1)
    raw["extra.bias"] = torch.zeros(3)
    torch.save(raw, tmp_path / "averaged_model.pt")
    weights = f"model.weights={tmp_path / 'averaged_model.pt'}"
    with pytest.raises(UserError, match=r"model.strict=true: .* does not fit exactly: .*set model.strict=false"):
        run_in_process(tmp_path / "strict", *SMALL, "debug=smoke", weights)
    summary = run_in_process(tmp_path / "lenient", *SMALL, "debug=smoke", weights, "model.strict=false")
    loaded = summary["transfer"]
    assert loaded["unexpected"] == ["n_averaged", "extra.bias"] and loaded["stripped_prefix"] == "module."
    assert loaded["loaded"] == loaded["total"]  # every tensor the model has came from the average
    assert f"loaded {summary['transfer']['loaded']}/{summary['transfer']['total']} tensors" in capsys.readouterr().out


def test_a_runs_averaged_weights_are_ensemble_members_and_a_teacher(averaged, tmp_path):
    run, summary = averaged
    members = f"ensemble.checkpoints=[{run}@ema,{run}@swa]"
    run_in_process(tmp_path / "fused", *SMALL, "trainer.epochs=0", "ensemble=average", members)
    report = json.loads((tmp_path / "fused" / "ensemble.json").read_text())
    figures = [m["test_acc"] for m in report["members"]]
    assert figures == pytest.approx([summary["ema_test_acc"], summary["swa_test_acc"]], abs=1e-6)
    distilled = run_in_process(
        tmp_path / "student", *SMALL, "debug=smoke", "distill=logits", f"distill.teacher={run}@swa"
    )
    assert distilled["status"] == "completed"
