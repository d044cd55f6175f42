"""DDP paths that differ from one process in what they cover: the test split of on-device data, and layers that
gradual unfreezing brings in after the DDP wrapper was built. Two CPU ranks under torchrun (gloo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from test_scale import DDP, failure, torchrun

from shelltrain.data import build_data
from shelltrain.engine import evaluate
from shelltrain.models import build_model
from shelltrain.schema import defaults


@pytest.mark.slow  # about 25 s: two torchrun ranks
def test_ddp_with_on_device_data_tests_the_whole_test_split(tmp_path: Path):
    """Rank 0 tests alone after training: it must see every test image, not its 1/N shard of them."""
    result = torchrun(*DDP, "trainer.epochs=1", "data.on_device=true", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, failure(result)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    cfg = compose_config(*DDP)
    data = build_data(cfg.data, cfg.augmentation, cfg.trainer.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    model.load_state_dict(torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)["model"])
    one_process = evaluate(model, data.test, defaults("trainer", epochs=0, device=torch.device("cpu")))
    tested = sum(row["support"] for row in summary["per_class"].values())
    assert tested == len(data.test.dataset)
    assert summary["test_acc"] == pytest.approx(one_process["acc"], abs=1e-6)
    assert summary["test_loss"] == pytest.approx(one_process["loss"], rel=1e-4)


@pytest.mark.slow
def test_gradual_unfreezing_under_ddp_keeps_the_ranks_equal(tmp_path: Path):
    """Layers unfrozen after epoch 1 must be all-reduced like the rest: the model checks at every validation that
    both ranks hold the same weights, and fails the run when they drifted apart."""
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    args = ["+model._target_=rank_checked_model.RankChecked", "finetune=gradual", "trainer.epochs=3"]
    result = torchrun(*DDP, *args, "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert result.returncode == 0, failure(result)
    events = json.loads((tmp_path / "run/summary.json").read_text())["transfer"]
    assert events, "gradual unfreezing left no record"


@pytest.mark.slow
def test_distillation_under_ddp_learns_from_the_teacher_on_every_rank(tmp_path: Path):
    """distill=logits under torchrun: each rank rebuilds the teacher on its device and distils its own shard; with
    alpha=1 (the teacher's outputs the only signal) the student still learns the task."""
    from conftest import run_in_process

    teacher = run_in_process(tmp_path / "teacher", *DDP, "trainer.epochs=4", "model.width=16")
    assert teacher["test_acc"] > 0.5
    distilled = ["distill=logits", f"distill.teacher={tmp_path / 'teacher'}", "distill.alpha=1"]
    result = torchrun(*DDP, "trainer.epochs=10", *distilled, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, failure(result)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["test_acc"] > 0.5  # chance is 0.1: the signal came from the teacher alone
