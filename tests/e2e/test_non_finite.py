"""A run whose weights become NaN or infinite stops with every checkpoint finite, and the one it names resumes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import run_in_process

from shelltrain.errors import UserError

EXPLODING = [  # lr 1e4: an optimizer step ruins the weights before any loss is NaN
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "trainer.epochs=2",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "optimizer.lr=1e4",
    "trainer.checkpoint_every_n_steps=1",
]


def finite(path: Path) -> bool:
    payload = torch.load(path, weights_only=True)
    tensors = [*payload["model"].values()]
    tensors += [t for state in payload["optimizer"]["state"].values() for t in state.values()]
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def test_a_non_finite_stop_keeps_only_finite_checkpoints_and_the_named_one_resumes(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match="became NaN or infinite") as stopped:
        run_in_process(run, *EXPLODING)
    named = re.search(r"the last good checkpoint is kept: (\S+) \(epoch (\d+), step (\d+)\)", str(stopped.value))
    assert named, stopped.value
    checkpoints = list(run.rglob("*.pt"))
    assert checkpoints and all(finite(p) for p in checkpoints), checkpoints
    assert torch.load(named.group(1), weights_only=True)["step"] == int(named.group(3))

    # It resumes: the same lr ruins the next step again, exactly as before, and still nothing non-finite is written.
    with pytest.raises(UserError, match="became NaN or infinite") as again:
        run_in_process(tmp_path / "resumed", *EXPLODING, f"trainer.resume={named.group(1)}")
    step = int(re.search(r"at epoch \d+, step (\d+)", str(again.value)).group(1))
    assert step > int(named.group(3)) and all(finite(p) for p in run.rglob("*.pt"))


def test_a_non_finite_prune_fine_tune_names_its_own_rate_and_keeps_the_trained_model(tmp_path):
    run = tmp_path / "run"
    exploding_finetune = ["prune=magnitude", "prune.finetune_epochs=1", "prune.finetune_lr_mult=1e8"]
    with pytest.raises(UserError, match=r"prune fine-tune .*lower prune.finetune_lr_mult \(now 100000000"):
        run_in_process(
            run, *EXPLODING[:7], "optimizer.lr=0.01", "scheduler=none", "trainer.epochs=1", *exploding_finetune
        )
    assert finite(run / "checkpoints/best.pt")
