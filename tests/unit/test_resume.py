"""Planning a resume (which checkpoint, which run directory) and restoring a run's state (resume.py), in process
with tiny checkpoints: no data, no training."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from shelltrain import resume, rundir
from shelltrain.checkpoint import save_checkpoint
from shelltrain.engine import TrainState
from shelltrain.errors import UserError
from shelltrain.optim import Schedule
from shelltrain.rng import restore_rng, rng_state

BASE = ["data=synthetic", "trainer.device=cpu"]


@pytest.fixture
def job(tmp_path, monkeypatch):
    """Compose a job as @hydra.main hands it over: HydraConfig set, launched in tmp_path, into a fresh run dir."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_module(config_module="shelltrain.configs", version_base="1.3"):

        def make(*overrides: str, fresh: str = "outputs/fresh") -> tuple[DictConfig, Path]:
            cfg = compose(config_name="train", overrides=[*BASE, *overrides], return_hydra_config=True)
            fresh_dir = tmp_path / fresh
            rundir.write_text("", fresh_dir / rundir.LOG)  # what Hydra writes at start-up
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(fresh_dir)
                cfg.hydra.runtime.cwd = str(tmp_path)
                cfg.hydra.job.num = 0
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            return cfg, fresh_dir

        yield make


def trained_run(run_dir: Path, cfg: DictConfig, last_epoch: int = 3, best_epoch: int = 1) -> Path:
    """A run directory with last.pt and best.pt, trained with `cfg`."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for path, epoch in ((rundir.last_checkpoint(run_dir), last_epoch), (rundir.best_checkpoint(run_dir), best_epoch)):
        save_checkpoint({"model": {}, "epoch": epoch, "step": 4 * epoch, "config": config, "overrides": []}, path)
    return run_dir


def test_a_run_directory_continues_in_place(job, tmp_path):
    original, _ = job()
    run_dir = trained_run(tmp_path / "outputs" / "first", original)
    cfg, fresh = job(f"trainer.resume={run_dir}")
    _, where, plan, _ = resume.plan(cfg, fresh, [f"trainer.resume={run_dir}"])
    assert where == run_dir and plan.in_place and plan.checkpoint == rundir.last_checkpoint(run_dir)
    assert plan.payload["epoch"] == 3  # loaded once, while planning
    assert not fresh.exists()  # the fresh Hydra directory went away
    assert HydraConfig.get().runtime.output_dir == str(run_dir)


def test_an_older_best_checkpoint_starts_a_new_run_directory(job, tmp_path):
    original, _ = job()
    run_dir = trained_run(tmp_path / "outputs" / "first", original, last_epoch=3, best_epoch=1)
    best = rundir.best_checkpoint(run_dir)
    cfg, fresh = job(f"trainer.resume={best}")
    _, where, plan, _ = resume.plan(cfg, fresh, [])
    assert where == fresh and not plan.in_place and plan.checkpoint == best
    assert fresh.exists()


def test_a_best_checkpoint_as_far_as_last_continues_in_place(job, tmp_path):
    original, _ = job()
    run_dir = trained_run(tmp_path / "outputs" / "first", original, last_epoch=2, best_epoch=2)
    cfg, fresh = job(f"trainer.resume={rundir.best_checkpoint(run_dir)}")
    _, where, plan, _ = resume.plan(cfg, fresh, [])
    assert where == run_dir and plan.in_place


def test_auto_finds_the_run_trained_with_this_config(job, tmp_path):
    matching, _ = job()
    other, _ = job("optimizer.lr=0.5")
    trained_run(tmp_path / "outputs" / "other", other)
    wanted = trained_run(tmp_path / "outputs" / "same", matching)
    cfg, fresh = job("trainer.resume=auto")
    _, where, plan, _ = resume.plan(cfg, fresh, ["trainer.resume=auto"])
    assert where == wanted and plan.in_place


def test_auto_without_a_match_starts_a_new_run(job, tmp_path, capsys):
    other, _ = job("optimizer.lr=0.5")
    trained_run(tmp_path / "outputs" / "other", other)
    cfg, fresh = job("trainer.resume=auto")
    _, where, plan, _ = resume.plan(cfg, fresh, [])
    assert where == fresh and plan is None
    assert "no checkpoint of this config" in capsys.readouterr().out


def test_a_directory_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no checkpoints/last.pt"):
        resume.resolve(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        resume.resolve(tmp_path / "missing")


def test_restore_puts_model_optimizer_schedule_and_rng_back(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), "epoch", False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        schedule.scheduler.step()
    state = TrainState(epoch=2, step=2, best_epoch=2, history=[{"epoch": 1.0}, {"epoch": 2.0}])
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": 2,
        "step": 2,
        "train_state": asdict(state),
        "rng": rng_state(),
    }
    save_checkpoint(payload, tmp_path / "last.pt")
    expected_draw = torch.rand(3)

    fresh = nn.Linear(3, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_schedule = Schedule(torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=1, gamma=0.5), "epoch", False)
    loaded = resume.payload_of(resume.Resume(tmp_path / "last.pt", in_place=True), tmp_path)
    restored = resume.restore_training(loaded, tmp_path / "last.pt", fresh, fresh_optimizer, fresh_schedule, scaler)

    assert restored == state
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    momentum = fresh_optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert fresh_schedule.scheduler.last_epoch == 2 and fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    restore_rng(resume.rng_of_this_rank(loaded, restored))
    assert torch.equal(torch.rand(3), expected_draw)


def test_restore_refuses_another_optimizer(tmp_path):
    model = nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    adam.step()
    payload = {"model": model.state_dict(), "optimizer": adam.state_dict(), "config": {"optimizer": {"_target_": "A"}}}
    sgd = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    sgd.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})  # another layout of parameter groups
    with pytest.raises(UserError, match=r"its optimizer state \(A\) does not fit the configured optimizer"):
        resume.restore_training(
            payload, tmp_path / "c.pt", model, sgd, None, torch.amp.GradScaler("cpu", enabled=False)
        )


def test_a_fresh_start_refuses_a_directory_holding_a_run(tmp_path):
    save_checkpoint({"model": {}}, rundir.last_checkpoint(tmp_path))
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints/last.pt\); continue it with"):
        resume.payload_of(None, tmp_path)


def test_config_changes_are_listed_by_key():
    before = {"optimizer": {"lr": 0.1}, "trainer": {"resume": None, "epochs": 2}}
    after = {"optimizer": {"lr": 0.2}, "trainer": {"resume": "auto", "epochs": 2}}
    assert resume.config_changes(before, after) == ["optimizer.lr: 0.1 -> 0.2"]


def test_a_run_continued_in_a_new_directory_gets_best_pt_as_the_monitor_selects(tmp_path):
    """Under an ema_ monitor best.pt holds the averaged weights (checkpoint.as_best), also when a resume seeds a new
    run directory from a last.pt that is the selected epoch's."""
    from shelltrain.checkpoint import load_checkpoint, save_checkpoint
    from shelltrain.engine import TrainState
    from shelltrain.resume import seed_new_run_dir

    state = TrainState(epoch=1, best_epoch=1)
    raw, averaged = torch.zeros(2), torch.ones(2)
    source = tmp_path / "old/checkpoints/last.pt"
    save_checkpoint({"model": {"w": raw}, "ema": {"module.w": averaged, "n_averaged": torch.tensor(3)}}, source)
    for monitor, expected in (("ema_val_acc", averaged), ("val_acc", raw)):
        seed_new_run_dir(source, state, tmp_path / monitor, monitor)
        assert torch.equal(load_checkpoint(tmp_path / monitor / "checkpoints/best.pt")["model"]["w"], expected)
