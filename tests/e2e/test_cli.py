"""The real `shelltrain` command: start-up, help, sweeps and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shelltrain

RUN_FILES = [
    ".hydra/config.yaml",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    "metrics.csv",
    "summary.json",
    "train.log",
]


def run_cli_reporting_torch(args: list[str], cwd) -> str:
    """Run the CLI in a fresh interpreter and report whether it imported torch (start-up must not)."""
    code = (
        f"import sys; sys.argv = ['shelltrain', *{args!r}]\n"
        "from shelltrain.start import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH_IMPORTED', 'torch' in sys.modules)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True).stdout


def test_help_lists_every_group_without_importing_torch(tmp_path):
    out = run_cli_reporting_torch(["--help"], tmp_path)
    assert "TORCH_IMPORTED False" in out
    for line in [
        "model: cnn, efficientnet_b0, mobilenet_v3_small, resnet18, resnet34, resnet50, timm, torchvision",
        "optimizer: adam, adamw, momentum, nesterov, rmsprop, sgd",
        "scheduler: cosine, exponential, none, onecycle, plateau, step, warmup_cosine",
        "augmentation: autoaugment, basic, none, randaugment, seed, trivialaugment",
        "data: cifar10, cifar100, digits, fashion_mnist, hf, imagefolder, manifest, mnist, shards, synthetic",
        "debug: overfit, smoke",
        "  model           the network (torchvision, timm, a small cnn, or your _target_)",
        "== Tasks (task=NAME) ==",
        "  evaluate   score a trained model (model.weights=RUN) on a split of the data",
    ]:
        assert line in out


def test_help_gives_every_group_and_task_a_meaning(tmp_path):
    from shelltrain.checks import TASKS

    out = run_cli_reporting_torch(["--help"], tmp_path)
    meanings = out.split("What each group is for:")[1].split("== Composed config")[0]
    named = {line.split()[0] for line in meanings.splitlines() if line.startswith("  ") and line.split()}
    packaged = Path(__file__).resolve().parents[2] / "configs"
    groups = {p.name for p in packaged.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")}
    assert named == groups | set(TASKS)


def test_cfg_job_prints_composed_config_without_torch(tmp_path):
    out = run_cli_reporting_torch(["--cfg", "job", "model=cnn", "optimizer=adamw"], tmp_path)
    assert "TORCH_IMPORTED False" in out
    assert "name: cnn" in out and "_target_: torch.optim.AdamW" in out
    assert not (tmp_path / "outputs").exists()  # printing the config writes nothing


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optimizer.lrr=0.1"], "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
        (
            ["model=resnet1800"],
            "model=resnet1800: no such option (did you mean 'resnet18'?). Available model options: cnn,",
        ),
        (["optimzer=adam"], "'optimzer' is not a config group (did you mean 'optimizer'?)"),
        (["optimizer.lr=-1"], "optimizer.lr=-1 is invalid; the learning rate must be a number > 0"),
        (["trainer.epochs=abc"], "trainer.epochs='abc' has the wrong type"),
        (["data=cifar10", "data.root=/nonexistent"], "data.root: '/nonexistent' does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
    result = shelltrain(*args, "trainer.device=cpu", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shelltrain: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not any(outputs.rglob("*.yaml"))  # no half-made run dir left


def test_full_error_env_keeps_the_traceback(tmp_path):
    env = {"HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "shelltrain", "optimizer.lr=-1", "trainer.device=cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env},
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError" in result.stderr


def test_multirun_sweep_makes_complete_run_dirs(tmp_path):
    result = shelltrain(
        "-m",
        "optimizer=sgd,adam",
        "debug=smoke",
        "model=cnn",
        "trainer.device=cpu",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        run_dir = tmp_path / "sweep" / job
        for name in RUN_FILES:
            assert (run_dir / name).is_file(), f"{job}/{name} missing"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
    assert "torch.optim.SGD" in (tmp_path / "sweep/0/.hydra/config.yaml").read_text()
    assert "torch.optim.Adam" in (tmp_path / "sweep/1/.hydra/config.yaml").read_text()


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_separate_dirs(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "shelltrain", "debug=smoke", "model=cnn", "trainer.device=cpu"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    summaries = list((tmp_path / "outputs").rglob("summary.json"))
    assert len(summaries) == 2


def test_version_is_shelltrains_and_torchs_without_importing_torch(tmp_path):
    from importlib.metadata import version

    out = run_cli_reporting_torch(["--version"], tmp_path)
    assert f"shelltrain {version('shelltrain')} (torch {version('torch')}," in out
    assert "Hydra" not in out
    assert "TORCH_IMPORTED False" in out


# The Python API: cli.run_in_dir

TINY = ["model=cnn", "model.width=8", "data.image_size=16", "debug=smoke"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epoch=1", "trainer.epoch"),  # a mistyped key: Hydra's ConfigCompositionException
        ("model=cnnn", "model=cnnn"),  # a mistyped option: Hydra's MissingConfigException
        ("data.batch_size=0", "data.batch_size"),  # a value schema.validate refuses
    ],
)
def test_run_in_dir_raises_user_error_for_config_mistakes_and_leaves_no_dir(tmp_path, override, message):
    from conftest import FAST

    from shelltrain.cli import run_in_dir
    from shelltrain.errors import UserError

    with pytest.raises(UserError, match=message) as caught:
        run_in_dir(tmp_path / "run", *FAST, *TINY, override)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_run_in_dir_logs_returns_an_absolute_run_dir_and_reports_missed_gates(tmp_path, monkeypatch):
    from conftest import FAST

    from shelltrain.cli import run_in_dir
    from shelltrain.errors import GateMissed, UserError

    monkeypatch.chdir(tmp_path)
    summary = run_in_dir("runs/a", *FAST, *TINY, "gate.test_acc_min=1.01")
    assert summary["run_dir"] == str(tmp_path / "runs" / "a")
    assert summary["gates"]["passed"] is False and summary["gates"]["failures"]
    log = (tmp_path / "runs/a/train.log").read_text()
    assert "[shelltrain][INFO] run directory:" in log and "preprocessing:" in log
    with pytest.raises(GateMissed, match="test_acc") as caught:
        run_in_dir("runs/b", *FAST, *TINY, "gate.test_acc_min=1.01", raise_on_gate=True)
    assert isinstance(caught.value, UserError) and caught.value.summary["gates"]["passed"] is False
    assert "runs/a" not in (tmp_path / "runs/b/train.log").read_text()  # each run logs into its own train.log
