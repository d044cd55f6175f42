"""Resume and fault tolerance: exact resume at and within epochs, SIGINT/SIGTERM, SIGKILL during
checkpoint writes, a full disk, a non-finite loss, retention, `auto`, and resuming older checkpoints."""

from __future__ import annotations

import csv
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_environment, interrupt_at_step, run_in_process, shelltrain, shelltrain_forked, start_shelltrain

from shelltrain import checkpoint as checkpoint_module
from shelltrain import engine, loggers, rundir
from shelltrain.errors import Interrupted, UserError
from shelltrain.rundir import has_checkpoint
from shelltrain.signals import GracefulStop

# Small, deterministic and still exercising every RNG: random augmentation (torch's global RNG, as
# num_workers=0), dropout, a per-step one-cycle schedule and momentum.
EXACT = [
    "model=cnn",
    "model.width=8",
    "model.dropout=0.2",
    "augmentation=seed",
    "trainer.deterministic=true",
    "trainer.epochs=4",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.checkpoint_every_n_steps=4",
    "trainer.keep_checkpoints=4",
    "trainer.threads=1",
]
STEPS_PER_EPOCH = 6
TIMINGS = {"seconds", "images_per_second"}


def exact(**changes: object) -> list[str]:
    """EXACT with some trainer keys changed (one override per key)."""
    changed = {f"trainer.{k}": v for k, v in changes.items()}
    return [a for a in EXACT if a.split("=")[0] not in changed] + [f"{k}={v}" for k, v in changed.items()]


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def without_timings(table: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in table]


def assert_same_training(a: Path, b: Path) -> None:
    wa = torch.load(a / "checkpoints/last.pt", weights_only=True)
    wb = torch.load(b / "checkpoints/last.pt", weights_only=True)
    assert wa["model"].keys() == wb["model"].keys()
    for key in wa["model"]:
        assert torch.equal(wa["model"][key], wb["model"][key]), key
    for key, state in wa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, wb["optimizer"]["state"][key][name]), (key, name)
    assert (wa["epoch"], wa["step"]) == (wb["epoch"], wb["step"]) == (4, 4 * STEPS_PER_EPOCH)
    assert without_timings(rows(a)) == without_timings(rows(b))
    assert [r["epoch"] for r in rows(b)] == ["1", "2", "3", "4"]  # appended, never repeated
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert (sa["test_acc"], sa["best_epoch"], sa["best_val_acc"]) == (
        sb["test_acc"],
        sb["best_epoch"],
        sb["best_val_acc"],
    )
    with open(b / "metrics.csv") as f:
        assert f.read().count("epoch,") == 1  # one header


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run_in_process(run_dir, *EXACT)
    return run_dir


@pytest.mark.parametrize(
    "how, step",
    [
        ("sigint", 2 * STEPS_PER_EPOCH),  # during epoch 2's last step: stops at the epoch boundary
        ("sigint", STEPS_PER_EPOCH + 3),  # mid-epoch 2: a checkpoint 3 batches into it
        ("crash", 2 * STEPS_PER_EPOCH + 4 + 1),  # the periodic checkpoint at step 16 (4 into epoch 3), then dies
    ],
    ids=["epoch-boundary", "mid-epoch-sigint", "mid-epoch-crash"],
)
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, straight, how, step):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, step, how)
        with pytest.raises(Interrupted if how == "sigint" else RuntimeError):
            run_in_process(run_dir, *EXACT)
    saved = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    expected_step = step if how == "sigint" else step - 1
    assert saved["step"] == expected_step
    assert saved["train_state"]["batch"] == expected_step % STEPS_PER_EPOCH
    run_in_process(run_dir, *EXACT, f"trainer.resume={run_dir}")
    assert_same_training(straight, run_dir)


def test_auto_resumes_the_newest_run_of_the_same_config(tmp_path, monkeypatch, straight):
    monkeypatch.chdir(tmp_path)  # auto looks under the fixed part of hydra.run.dir: ./outputs
    interrupted = tmp_path / "outputs/day/interrupted"
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, STEPS_PER_EPOCH + 2, "sigint")
        with pytest.raises(Interrupted):
            run_in_process(interrupted, *EXACT)
    other = tmp_path / "outputs/day/other-seed"  # a different config is never picked
    run_in_process(other, *exact(seed=1, epochs=1))
    fresh = tmp_path / "outputs/day/fresh"
    summary = run_in_process(fresh, *EXACT, "trainer.resume=auto")
    assert summary["run_dir"] == str(interrupted)
    assert not fresh.exists()  # the new job's own directory is not left behind
    assert_same_training(straight, interrupted)
    again = tmp_path / "outputs/day/again"  # auto on a finished run: nothing to do, nothing changed
    before = (interrupted / "summary.json").read_text()
    run_in_process(again, *EXACT, "trainer.resume=auto")
    assert (interrupted / "summary.json").read_text() == before and not again.exists()
    new = tmp_path / "outputs/day/new"  # auto with no run of this config starts one
    run_in_process(new, *exact(epochs=1, seed=2, resume="auto"))
    assert json.loads((new / "summary.json").read_text())["status"] == "completed"


def test_older_checkpoint_continues_in_a_new_dir_and_leaves_the_original_alone(tmp_path, straight):
    original = {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()}
    branch = tmp_path / "branch"
    summary = run_in_process(branch, *EXACT, f"trainer.resume={straight / 'checkpoints/epoch_002.pt'}")
    assert summary["run_dir"] == str(branch)
    assert_same_training(straight, branch)  # epochs 3 and 4 again, exactly, in the new directory
    assert {p: p.read_bytes() for p in straight.rglob("*") if p.is_file()} == original


ENSEMBLE = [*EXACT, "ensemble=average", "ensemble.members=2"]


def test_an_interrupted_ensemble_resumes_from_its_run_dir_and_equals_an_uninterrupted_one(
    tmp_path, monkeypatch, capsys
):
    straight = tmp_path / "straight"
    run_in_process(straight, *ENSEMBLE)
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4 * STEPS_PER_EPOCH + STEPS_PER_EPOCH + 3, "sigint")  # member 2, mid-epoch 2
        with pytest.raises(Interrupted) as stopped:
            run_in_process(run_dir, *ENSEMBLE)
    assert stopped.value.run_dir == run_dir  # what the printed resume command names: the ensemble, not a member
    assert has_checkpoint(run_dir) and not (run_dir / "summary.json").exists()
    first = {p: p.read_bytes() for p in (run_dir / "members/0").rglob("*") if p.is_file()}
    (run_dir / ".hydra").mkdir()  # as Hydra records it: `trainer.resume=DIR` alone rebuilds the ensemble's config
    (run_dir / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in ENSEMBLE))

    capsys.readouterr()
    summary = run_in_process(tmp_path / "fresh", f"trainer.resume={run_dir}")
    assert summary["run_dir"] == str(run_dir) and not (tmp_path / "fresh").exists()
    out = " ".join(capsys.readouterr().out.split())
    assert f"{run_dir}/members/0 already finished its 4 epochs; nothing to resume" in out, out
    where = "epoch 1 done, step 9, 3 batches into epoch 2"
    assert f"resuming from {run_dir}/members/1/checkpoints/last.pt ({where})" in out
    assert {p: p.read_bytes() for p in (run_dir / "members/0").rglob("*") if p.is_file()} == first  # kept as it was
    for member in ("members/0", "members/1"):
        assert_same_training(straight / member, run_dir / member)
    a, b = (json.loads((d / "ensemble.json").read_text()) for d in (straight, run_dir))
    assert (a["val_loss"], a["test_loss"]) == (b["val_loss"], b["test_loss"])
    assert [m["test_loss"] for m in a["members"]] == [m["test_loss"] for m in b["members"]]
    assert summary["test_acc"] == json.loads((straight / "summary.json").read_text())["test_acc"]


def test_an_ensemble_resumes_only_from_its_run_dir(tmp_path, straight):
    with pytest.raises(UserError, match="last.pt: an ensemble run resumes from its run directory"):
        run_in_process(tmp_path / "a", *ENSEMBLE, f"trainer.resume={straight / 'checkpoints/last.pt'}")
    with pytest.raises(UserError, match="is a single run's checkpoint; an ensemble resumes from its own run directory"):
        run_in_process(tmp_path / "b", *ENSEMBLE, f"trainer.resume={straight}")


def test_sigint_saves_exits_130_and_the_printed_command_finishes_the_run(tmp_path):
    args = [
        "model=cnn",
        "model.width=8",
        "data.image_size=16",
        "trainer.device=cpu",
        "trainer.epochs=2",
        "trainer.limit_train_batches=20",
        "plots=false",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.checkpoint_every_n_steps=1",
    ]
    proc = start_shelltrain(*args, cwd=tmp_path)
    last = None
    deadline = time.time() + 120
    while last is None and time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "outputs").glob("*/*/checkpoints/last.pt"))
        last = found[0] if found else None
        time.sleep(0.05)
    assert last is not None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run_dir = last.parent.parent
    assert "SIGINT received" in err and f"a checkpoint was saved in {run_dir}" in err
    command = err.split("Resume with:\n", 1)[1].strip().splitlines()[0]
    assert command.startswith("shelltrain ") and command.endswith(f"trainer.resume={run_dir}")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    torch.load(last, weights_only=True)

    resumed = shelltrain_forked(*shlex.split(command)[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [r["epoch"] for r in rows(run_dir)] == ["1", "2"]
    assert list((tmp_path / "outputs").glob("*/*")) == [run_dir]  # no second run dir
    assert "resuming from" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_loader_workers_exits_143_with_a_resumable_checkpoint(tmp_path):
    """A cluster's SIGTERM reaches every process of the job, data-loader workers included."""
    args = [
        "model=cnn",
        "model.width=8",
        "trainer.device=cpu",
        "data.num_workers=2",
        "trainer.epochs=3",
        "trainer.limit_train_batches=40",
        "trainer.checkpoint_every_n_steps=1",
        "hydra.run.dir=run",
    ]
    proc = start_shelltrain(*args, cwd=tmp_path, new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "run/checkpoints/last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM received" in err and f"trainer.resume={tmp_path / 'run'}" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] >= 1


def test_a_second_signal_interrupts_at_once():
    with GracefulStop() as stop:
        assert not stop()
        stop.handle(signal.SIGINT)
        assert stop() and stop.signum == signal.SIGINT
        with pytest.raises(Interrupted) as caught:
            stop.handle(signal.SIGINT)
    assert caught.value.exit_code == 130 and not caught.value.saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


KILL_DRIVER = textwrap.dedent(
    """
    import glob, json, os, random, signal, sys, time
    import torch
    import shelltrain.runner, shelltrain.schema  # imported once: every child is a fork and starts at once
    import sklearn.datasets, sklearn.model_selection  # (shelltrain.data imports these lazily)
    from shelltrain.cli import main

    run_dir, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    tmp = os.path.join(run_dir, "checkpoints", ".last.pt.*.tmp")  # each writer's own: .last.pt.<pid>-<random>.tmp
    argv = ["shelltrain", "model=cnn", "model.width=48", "data.image_size=16", "trainer.device=cpu", "trainer.epochs=1000",
            "trainer.checkpoint_every_n_steps=1", "trainer.limit_val_batches=1", "trainer.threads=1",
            "trainer.resume=auto", f"hydra.run.dir={run_dir}", "hydra/job_logging=disabled"]
    rng = random.Random(seed)
    results = []
    while len(results) < kills:
        before = os.stat(last).st_mtime_ns if os.path.exists(last) else None
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1); os.dup2(devnull, 2)
            sys.argv = argv
            try:
                main()
            finally:
                os._exit(3)
        deadline = time.time() + 60
        while time.time() < deadline:  # until this child has written a checkpoint of its own
            if os.path.exists(last) and os.stat(last).st_mtime_ns != before:
                break
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                results.append({"error": "the child exited before writing a checkpoint"})
                pid = None
                break
            time.sleep(0.01)
        if pid is None:
            break
        if len(results) % 2:  # every other kill aims into a write: as soon as the temporary file appears
            end = time.time() + 5
            while not glob.glob(tmp) and time.time() < end:
                time.sleep(0.0005)
        else:  # the others land anywhere: a step, a write, validation, ...
            time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        mid_write = bool(glob.glob(tmp))  # the kill came between opening the temporary file and the rename
        try:
            ckpt = torch.load(last, weights_only=True)
            results.append({"step": int(ckpt["step"]), "killed": os.WIFSIGNALED(status), "mid_write": mid_write})
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}"})
        for name in glob.glob(tmp):
            os.unlink(name)
    print(json.dumps(results))
    """
)


def test_sigkill_at_random_moments_never_breaks_last_pt(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, str(tmp_path / "run"), "8", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_environment(),
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r for r in results if "error" in r] == []
    assert len(results) == 8, results  # many kills, each at a random moment of a run writing every step
    steps = [r["step"] for r in results]
    assert steps == sorted(steps) and steps[-1] > steps[0]  # every restart resumed where the last one died
    assert all(r["killed"] for r in results)
    assert any(r["mid_write"] for r in results), results  # some kills really did interrupt a write


def test_full_disk_is_one_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real = rundir._write_durably
    calls = {"n": 0}

    def disk_fills_up(tmp: Path, data: rundir.FileBytes) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:  # epoch 1: last.pt and metrics.csv (best.pt is a hard link to last.pt's bytes)
            return real(tmp, data)
        whole = b"".join(rundir.pieces(data))  # a checkpoint comes in pieces
        tmp.write_bytes(whole[: len(whole) // 2])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(rundir, "_write_durably", disk_fills_up)
    with pytest.raises(UserError) as caught:
        run_in_process(
            run_dir,
            "model=cnn",
            "model.width=8",
            "trainer.epochs=3",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
        )
    message = str(caught.value)
    assert (
        "No space left on device" in message and "is full" in message and "earlier checkpoints are untouched" in message
    )
    assert "\n" not in message
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.slow
def test_a_really_full_disk_via_tmpfs(tmp_path):
    disk = tmp_path / "disk"
    # room for epoch 1's last.pt (~216 KB; best.pt is a hard link to it), not for epoch 2's beside it
    if not _mount_tmpfs(disk, "300k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = shelltrain(
            "model=cnn",
            "model.width=16",
            "trainer.device=cpu",
            "trainer.epochs=3",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            f"hydra.run.dir={disk}/run",
            cwd=tmp_path,
        )
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "is full" in lines[0], result.stderr
        assert not list((disk / "run/checkpoints").glob(".*.tmp"))
        assert torch.load(disk / "run/checkpoints/last.pt", weights_only=True)["epoch"] == 1
        assert torch.load(disk / "run/checkpoints/best.pt", weights_only=True)["epoch"] == 1
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = engine.criterion
    calls = {"n": 0}

    def poisoned(logits, targets, settings):
        loss = real(logits, targets, settings)
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training batch: epoch 3, step 5 (2 steps per epoch)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(engine, "criterion", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        run_in_process(
            run_dir,
            "model=cnn",
            "model.width=8",
            "trainer.epochs=4",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
        )
    message = str(caught.value)
    assert "the training loss became nan at epoch 3, step 5" in message
    assert f"the last good checkpoint is kept: {run_dir / 'checkpoints/last.pt'} (epoch 2, step 4)" in message
    assert "lower optimizer.lr" in message and "trainer.grad_clip" in message and "\n" not in message
    kept = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert kept["epoch"] == 2 and all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_keep_checkpoints_keeps_the_best_epochs(tmp_path):
    run_in_process(
        tmp_path,
        "model=cnn",
        "model.width=8",
        "trainer.epochs=5",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.keep_checkpoints=2",
        "trainer.monitor=val_loss",
    )
    losses = {int(r["epoch"]): float(r["val_loss"]) for r in rows(tmp_path)}
    best_two = sorted(losses, key=lambda e: (losses[e], e))[:2]
    kept = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").glob("epoch_*.pt"))
    assert kept == sorted(best_two)
    for epoch in kept:
        assert torch.load(tmp_path / f"checkpoints/epoch_{epoch:03d}.pt", weights_only=True)["epoch"] == epoch


def test_a_finished_run_dir_is_not_overwritten_by_a_new_run(tmp_path):
    run_in_process(tmp_path, "model=cnn", "model.width=8", "debug=smoke")
    with pytest.raises(UserError, match="already holds a run"):
        run_in_process(tmp_path, "model=cnn", "model.width=8", "debug=smoke")


def test_another_model_is_named_by_its_missing_and_unexpected_keys(tmp_path):
    from shelltrain.models import SmallCNN, build_model
    from shelltrain.schema import packaged

    resnet = build_model(packaged("model"), 10, 1)  # resnet18, the packaged default
    payload = {"model": SmallCNN(10, 1, width=4).state_dict(), "config": {"model": {"name": "cnn", "width": 4}}}
    with pytest.raises(UserError) as caught:
        checkpoint_module.load_model_state(payload["model"], tmp_path / "c.pt", resnet, payload["config"])
    message = str(caught.value)
    assert (
        "(it was trained with model=cnn model.width=4): missing keys: conv1.weight, bn1.weight, bn1.bias and 119 more; "
        in message
    )
    assert "unexpected keys: features.0.weight, features.1.weight, features.1.bias and 17 more" in message


def test_metrics_sync_restores_a_row_lost_in_a_crash(tmp_path):
    metrics = loggers.MetricsCSV(tmp_path / "metrics.csv")
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_acc": 0.5} for e in (1, 2, 3)]
    for row in history[:2]:  # the crash came after checkpoint 3, before its row
        metrics.append(row)
    metrics.sync(history)
    assert [r["epoch"] for r in rows(tmp_path)] == ["1", "2", "3"]
    before = (tmp_path / "metrics.csv").read_text()
    metrics.sync(history)  # already in sync: untouched
    assert (tmp_path / "metrics.csv").read_text() == before


def test_a_run_dir_stopped_before_its_first_checkpoint_is_not_offered_for_resume(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)  # what a run killed while it built its data leaves
    (run / "train.log").write_text("a run killed while it built its data\n")
    refused = shelltrain_forked("model=cnn", "model.width=8", "debug=smoke", f"hydra.run.dir={run}", cwd=tmp_path)
    assert refused.returncode == 2 and "stopped before its first checkpoint" in refused.stderr
    assert "trainer.resume" not in refused.stderr


def test_a_resume_after_the_training_data_changed_says_so(tmp_path):
    tiny = ["model=cnn", "model.width=8", "data.image_size=16", "scheduler=none", "trainer.threads=1"]
    run_in_process(tmp_path / "run", *tiny, "data.limit_samples=240", "trainer.epochs=1")
    with pytest.raises(UserError, match=r"took \d+ optimizer steps per epoch, this one takes \d+: the training data"):
        run_in_process(
            tmp_path / "more",
            *tiny,
            "data.limit_samples=480",
            "trainer.epochs=2",
            f"trainer.resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
        )
