"""task=lr_find: the exponential LR ramp, its early stop on a diverging loss, its files and its suggestion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, run_in_process
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from shelltrain.data.loader import Loader
from shelltrain.engine import make_scaler
from shelltrain.errors import UserError
from shelltrain.lr_find import ramp, suggest
from shelltrain.schema import defaults, validate


def _ramp(diverge: float, precision: str = "32", scaler: torch.amp.GradScaler | None = None) -> list[dict[str, float]]:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(256, 1, 4, 4, generator=generator), torch.randint(0, 3, (256,), generator=generator)
    loader = Loader(TensorDataset(images, labels), batch_size=32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    options = OmegaConf.structured(defaults("lr_find", start_lr=1e-4, end_lr=1e4, steps=100, diverge=diverge))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    settings = defaults("trainer", device="cpu", channels_last=False, precision=precision)
    return ramp(model, optimizer, loader, settings, options, scaler or make_scaler(settings))


class RecordingScaler(torch.amp.GradScaler):
    """A real loss scaler on the CPU that keeps every loss it was asked to scale."""

    def __init__(self) -> None:
        super().__init__("cpu", init_scale=1024.0)
        self.scaled: list[float] = []

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        self.scaled.append(float(outputs.detach()))
        return super().scale(outputs)


def test_the_ramp_under_fp16_scales_the_loss_as_fit_does():
    """16-mixed (CPU fp16 autocast here): every step's loss goes through the run's GradScaler before backward, so
    small fp16 gradients do not underflow to zero."""
    scaler = RecordingScaler()
    rows = _ramp(diverge=4.0, precision="16-mixed", scaler=scaler)
    assert len(scaler.scaled) == len(rows) > 10
    assert scaler.scaled == pytest.approx([row["loss"] for row in rows], rel=1e-3)
    assert make_scaler(defaults("trainer", device="cpu", precision="16-mixed")).is_enabled()


def test_a_diverging_loss_stops_the_ramp_early():
    rows = _ramp(diverge=4.0)
    assert 10 < len(rows) < 100  # the loss blew up long before lr reached 1e4
    assert rows[-1]["smoothed"] > 4.0 * min(row["smoothed"] for row in rows[:-1])  # the step that crossed the line
    lrs = [row["lr"] for row in rows]
    assert np.allclose(np.diff(np.log(lrs)), np.log(1e8) / 99)  # exponential: a constant ratio per step
    assert len(_ramp(diverge=1e30)) == 100  # the loss stays finite: the divergence rule is what stopped it


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = np.logspace(-5, 1, 61)
    smoothed = 2.0 - np.tanh(np.log10(lrs) + 2) + np.where(lrs > 0.3, 50 * (lrs - 0.3), 0.0)
    choice = suggest([{"lr": lr, "loss": s, "smoothed": s} for lr, s in zip(lrs, smoothed)], 4.0)
    assert np.isclose(np.log10(choice["suggested_lr"]), -2, atol=0.11)
    assert np.isclose(choice["min_div_10"], choice["min_loss_lr"] / 10)


def test_lr_find_writes_its_report_and_plot_and_prints_the_override(tmp_path, capsys):
    run_dir = tmp_path / "lr"
    summary = run_in_process(
        run_dir, "task=lr_find", "model=cnn", "model.width=8", "data.image_size=16", "lr_find.steps=40", "plots=true"
    )
    report = json.loads((run_dir / "lr_find.json").read_text())
    assert (run_dir / "plots" / "lr_find.png").stat().st_size > 0
    assert 1e-6 <= report["suggested_lr"] <= 10.0 and report["suggested_lr"] == summary["suggested_lr"]
    assert len(report["rows"]) == report["steps_run"] <= 40
    assert f"optimizer.lr={report['suggested_lr']:.3g}" in capsys.readouterr().out


def test_no_point_after_the_loss_diverged_is_suggested():
    """Rows that go on after the smoothed loss passed lr_find.diverge times its lowest value (at 1e-3) and then
    fell lower still, steepest at 3e-2: the suggestion stays before the divergence."""
    lrs = np.logspace(-5, 0, 51)
    log = np.log10(lrs)
    smoothed = np.select([log < -3.01, log < -2.01], [2.0 - log / 5, 20.0], 0.1 - np.tanh(3 * (log + 1.5)))
    choice = suggest([{"lr": lr, "loss": s, "smoothed": s} for lr, s in zip(lrs, smoothed)], 4.0)
    assert choice["suggested_lr"] is not None and choice["suggested_lr"] < 1e-3


@pytest.mark.parametrize(
    "losses",
    [[2.3, 40.0, 900.0], [2.3, 2.4, 2.6, 3.0, 9.9], []],
    ids=["diverged-at-once", "only-rose", "not-finite-at-first"],
)
def test_without_a_descent_no_rate_is_suggested_and_the_reason_names_start_lr(losses):
    rows = [{"lr": 1e6 * 10**i, "loss": v, "smoothed": v} for i, v in enumerate(losses)]
    choice = suggest(rows, 4.0)
    assert choice["suggested_lr"] is None and choice["min_div_10"] is None
    assert "lr_find.start_lr" in choice["no_suggestion"]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["lr_find.end_lr=inf"], "lr_find.end_lr=inf is not a finite number"),
        (["lr_find.start_lr=1e-3", "lr_find.end_lr=1e-3"], "lr_find.end_lr=0.001 is not above lr_find.start_lr"),
        (["lr_find.start_lr=10", "lr_find.end_lr=1"], "lr_find.end_lr=1.0 is not above lr_find.start_lr=10.0"),
        (["lr_find.start_lr=0"], "lr_find.start_lr=0.0 must be > 0"),
        (["lr_find.start_lr=-1"], "lr_find.start_lr=-1.0 must be > 0"),
    ],
)
def test_a_range_the_ramp_cannot_run_is_refused_naming_the_key(overrides, named):
    with pytest.raises(UserError, match=named):
        validate(compose_config("task=lr_find", *overrides))


def test_lr_find_without_a_good_rate_says_so_and_prints_no_number(tmp_path, capsys):
    run_dir = tmp_path / "lr"
    overrides = ["task=lr_find", "model=cnn", "model.width=8", "data.image_size=16", "lr_find.steps=40"]
    with pytest.raises(UserError, match="lr_find: no good learning rate found: .*lower lr_find.start_lr"):
        run_in_process(run_dir, *overrides, "lr_find.start_lr=1e6", "lr_find.end_lr=1e9", "plots=false")
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "lr_find.json").read_text())
    assert summary["status"] == "failed" and summary["suggested_lr"] is None and "no good" in summary["error"]
    assert report["suggested_lr"] is None and report["rows"]  # the curve is kept for a look
    assert "optimizer.lr=" not in capsys.readouterr().out
