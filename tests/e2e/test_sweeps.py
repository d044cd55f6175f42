"""Sweeps and CI: the sweep table, failed jobs, launchers, Optuna, presets, quality gates, cross-validation.

Jobs are kept tiny (model=cnn model.width=8 debug=smoke); every subprocess job still costs seconds, so each
behaviour is exercised by one real command and the rest is tested in-process.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import compose_config, run_in_process, shelltrain, shelltrain_forked
from omegaconf import open_dict

from shelltrain import gates, sweep, sweep_table
from shelltrain.errors import UserError
from shelltrain.schema import validate

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=cnn", "model.width=8", "debug=smoke", "trainer.device=cpu", "plots=false"]
SWEEP_EXTRA = 'not installed; install the sweep extra: pip install -e ".[test,sweep]" (CI does)'


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _plugin(module: str, package: str) -> None:
    pytest.importorskip(f"hydra_plugins.{module}", reason=f"{package} {SWEEP_EXTRA}")


# ---- sweep summary ------------------------------------------------------------------------------------------------


def test_sweep_writes_summary_csv_and_prints_the_table(tmp_path):
    result = shelltrain_forked(
        "-m", "optimizer=sgd,adam", "optimizer.lr=0.01,0.1", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = _csv(tmp_path / "sweep/summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [(r["optimizer"], r["optimizer.lr"]) for r in rows] == [
        ("sgd", "0.01"),
        ("sgd", "0.1"),
        ("adam", "0.01"),
        ("adam", "0.1"),
    ]
    assert all(r["status"] == "completed" and r["monitor"] == "val_acc" for r in rows)
    for row in rows:  # the figures are the job's own summary.json
        summary = json.loads((tmp_path / "sweep" / row["run_dir"] / "summary.json").read_text())
        assert float(row["test_acc"]) == pytest.approx(summary["test_acc"])
        assert float(row["score"]) == pytest.approx(summary["best_val_acc"])
        assert float(row["wall_seconds"]) == pytest.approx(summary["wall_seconds"])
    by_rank = sorted(rows, key=lambda r: int(r["rank"]))
    scores = [float(r["score"]) for r in by_rank]
    assert scores == sorted(scores, reverse=True)  # rank 1 is the best val_acc
    assert "shelltrain sweep" in result.stdout and "4 runs: 4 completed" in result.stdout
    assert "optimizer.lr" in result.stdout  # the swept keys are the table's columns
    assert not (tmp_path / "sweep/sweep.png").exists()  # every job said plots=false


@pytest.mark.slow
def test_a_sweep_over_ensemble_options_summarizes_every_job(tmp_path):
    result = shelltrain_forked(
        "-m",
        "ensemble=average,vote",
        "ensemble.members=2",
        *TINY,
        "model.width=4",
        "trainer.threads=1",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = _csv(tmp_path / "sweep/summary.csv")
    assert [(r["ensemble"], r["status"]) for r in rows] == [("average", "completed"), ("vote", "completed")]
    for row in rows:  # an ensemble job's summary.json: the ensemble's figures, its members in a section
        summary = json.loads((tmp_path / "sweep" / row["run_dir"] / "summary.json").read_text())
        assert summary["ensemble"]["rule"] == row["ensemble"] and len(summary["ensemble"]["members"]) == 2
        assert float(row["test_acc"]) == pytest.approx(summary["test_acc"])
        assert float(row["score"]) == pytest.approx(summary["best_val_acc"])


def test_a_failed_job_is_recorded_the_others_finish_and_the_sweep_exits_4(tmp_path):
    result = shelltrain_forked("-m", "optimizer.lr=-1,0.01", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == sweep.EXIT_JOBS_FAILED == 4, result.stderr
    rows = {r["job"]: r for r in _csv(tmp_path / "sweep/summary.csv")}
    assert rows["0"]["status"] == "failed" and rows["1"]["status"] == "completed"  # the job after it still ran
    assert "optimizer.lr=-1 is invalid" in rows["0"]["error"]
    failed = json.loads((tmp_path / "sweep/0/summary.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "UserError"
    assert "optimizer.lr=-1 is invalid" in failed["error"]
    assert "2 runs: 1 completed, 1 failed" in result.stdout  # the table was printed
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("shelltrain: error: 1 of 2 sweep jobs failed (first: job 0: optimizer.lr=-1 is invalid")
    assert "Traceback" not in result.stderr


def _fake_run(root: Path, job: int, overrides: list[str], summary: dict | None, monitor: str = "val_acc") -> Path:
    run = root / str(job)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra/hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": job}}}))
    (run / ".hydra/config.yaml").write_text(yaml.safe_dump({"trainer": {"monitor": monitor}}))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _fake_sweep(root: Path) -> Path:
    """The mark Hydra leaves in a sweep dir it launches."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _age(run: Path, seconds: float = 3600) -> None:
    """Make every file of a run dir look `seconds` old (a job killed long ago, not one running)."""
    then = time.time() - seconds
    for path in run.rglob("*"):
        os.utime(path, (then, then))


def test_summarize_reads_finished_runs_from_disk(tmp_path, capsys):
    _fake_sweep(tmp_path)
    ok = {"status": "completed", "test_acc": 0.9, "best_val_acc": 0.91, "wall_seconds": 3.0}
    _fake_run(tmp_path, 0, ["model=cnn", "trainer.seed=0"], {**ok, "best_val_acc": 0.80})
    _fake_run(tmp_path, 1, ["model=cnn", "trainer.seed=1"], ok)
    _fake_run(tmp_path, 2, ["model=cnn", "trainer.seed=2"], {"status": "failed", "error": "boom"})
    _age(_fake_run(tmp_path, 10, ["model=cnn", "trainer.seed=3"], None))  # killed long ago: no summary.json
    _fake_run(tmp_path, 11, ["model=cnn", "trainer.seed=4"], None)  # no summary.json yet, written to just now
    assert sweep.main([str(tmp_path)]) == 4
    rows = _csv(tmp_path / "summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "10", "11"]  # job order, numerically
    assert [r["trainer.seed"] for r in rows] == ["0", "1", "2", "3", "4"] and "model" not in rows[0]  # swept keys
    assert [r["rank"] for r in rows] == ["2", "1", "", "", ""]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "incomplete", "running"]
    assert rows[2]["error"] == "boom" and "no summary.json" in rows[3]["error"] and rows[4]["error"] == ""
    out = capsys.readouterr().out
    assert (
        "5 runs: 2 completed, 1 running, 1 incomplete, 1 failed" in out and "best: job 1" in out
    )  # killed: not "failed"
    assert "run dir" in out and "│ 11 " in out.replace("┃", "│")  # the run-directory column
    assert (tmp_path / "sweep.png").stat().st_size > 0  # the score against trainer.seed, beside summary.csv
    # a loss is minimized; all completed -> exit 0
    loss_dir = _fake_sweep(tmp_path / "loss")
    _fake_run(loss_dir, 0, ["a=1"], {"status": "completed", "best_val_loss": 0.5}, monitor="val_loss")
    _fake_run(loss_dir, 1, ["a=2"], {"status": "completed", "best_val_loss": 0.2}, monitor="val_loss")
    assert sweep.main([str(loss_dir)]) == 0
    assert [r["rank"] for r in _csv(loss_dir / "summary.csv")] == ["2", "1"]


def test_summarize_writes_summary_csv_only_into_a_sweep_dir_or_where_told(tmp_path, capsys):
    outputs = tmp_path / "outputs"  # a folder of single runs, not a sweep dir
    _fake_run(outputs, 0, ["x=1"], {"status": "completed", "best_val_acc": 0.5, "test_acc": 0.4})
    _fake_run(outputs, 1, ["x=2"], None)  # still running: not a failure
    assert sweep.main([str(outputs)]) == 0
    assert not (outputs / "summary.csv").exists() and not (outputs / "sweep.png").exists()
    out = capsys.readouterr().out
    assert "2 runs: 1 completed, 1 running;" in out and "not a sweep dir" in out and "--out" in out
    assert sweep.main([str(outputs), "--out", str(tmp_path / "table.csv")]) == 0
    assert [r["status"] for r in _csv(tmp_path / "table.csv")] == ["completed", "running"]
    assert sweep.main([str(outputs / "0")]) == 0 and not (outputs / "0/summary.csv").exists()  # one run dir


def test_summary_out_where_no_file_can_be_written_is_one_line_exit_2(tmp_path, capsys):
    sweep_dir = _fake_sweep(tmp_path / "sweep")
    _fake_run(sweep_dir, 0, ["x=1"], {"status": "completed", "best_val_acc": 0.5, "test_acc": 0.4})
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file" / "table.csv", tmp_path / "missing" / "table.csv", sweep_dir):
        assert sweep.main([str(sweep_dir), "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("shelltrain-summary: error: --out ") and str(out) in line
    assert not (sweep_dir / "summary.csv").exists()  # nothing written elsewhere instead


def test_report_per_job_line_prints_one_line_instead_of_the_table(tmp_path, capsys):
    run_in_process(tmp_path / "run", *TINY, "report.per_job=line")
    out = capsys.readouterr().out
    assert "shelltrain summary" not in out
    assert [line for line in out.splitlines() if line.startswith("completed: test_acc ")]
    with pytest.raises(UserError, match="report.per_job='lines' is invalid; choose one of table, line"):
        validate(compose_config("report.per_job=lines"))


def test_shelltrain_summarize_command(tmp_path):
    _fake_sweep(tmp_path / "sweep")
    _fake_run(tmp_path / "sweep", 0, ["x=1"], {"status": "completed", "best_val_acc": 0.5, "test_acc": 0.4})
    result = shelltrain_forked("summarize", "sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sweep/summary.csv").is_file() and "1 run: 1 completed" in result.stdout
    missing = shelltrain_forked("summarize", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "'nowhere' is not a directory" in missing.stderr


# ---- launchers and Optuna -------------------------------------------------------------------------------------------


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    _plugin("hydra_joblib_launcher", "hydra-joblib-launcher")
    result = shelltrain(  # a fresh interpreter: loky's worker processes hang when started from a forked process
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer.seed=0,1",
        *TINY,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = _csv(tmp_path / "sweep/summary.csv")
    assert [r["status"] for r in rows] == ["completed", "completed"]
    hydra_cfg = yaml.safe_load((tmp_path / "sweep/0/.hydra/hydra.yaml").read_text())["hydra"]
    assert hydra_cfg["launcher"]["_target_"].endswith("JoblibLauncher") and hydra_cfg["launcher"]["n_jobs"] == 2
    lines = result.stdout.splitlines()  # two jobs printing at once: each line says whose it is
    assert any(line.startswith("[job 0] epoch 1/") for line in lines), result.stdout
    assert any(line.startswith("[job 1] epoch 1/") for line in lines), result.stdout


def test_optuna_search_runs_three_trials_in_memory(tmp_path):
    _plugin("hydra_optuna_sweeper", "hydra-optuna-sweeper")
    result = shelltrain_forked(
        "hparams_search=optuna", "hydra.sweeper.n_trials=3", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = _csv(tmp_path / "sweep/summary.csv")
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    assert {"optimizer.lr", "optimizer.weight_decay", "data.batch_size"} <= set(rows[0])  # the YAML search space
    best = yaml.safe_load((tmp_path / "sweep/optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(float(r["score"]) for r in rows))  # trials returned the score


def test_optuna_direction_must_follow_the_monitor():
    from omegaconf import OmegaConf

    from shelltrain.cli import _check_sweeper

    cfg = OmegaConf.create({"trainer": {"monitor": "val_loss"}})
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}
    with pytest.raises(UserError, match="set hydra.sweeper.direction=minimize"):
        _check_sweeper(OmegaConf.create({"sweeper": {**optuna, "direction": "maximize"}}), cfg)
    _check_sweeper(OmegaConf.create({"sweeper": {**optuna, "direction": "minimize"}}), cfg)


def test_missing_plugin_names_the_extra():
    from hydra.errors import MissingConfigException

    from shelltrain.cli import explain

    exc = MissingConfigException("missing", missing_cfg_file="hydra/launcher/joblib", options=["basic"])
    assert explain(exc) == (
        "hydra/launcher=joblib needs the hydra-joblib-launcher plugin, which is not installed; "
        'install the sweep extra: pip install "shelltrain[sweep]"'
    )


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    _plugin("hydra_submitit_launcher", "hydra-submitit-launcher")
    result = shelltrain(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "trainer.seed=0",
        *TINY,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in _csv(tmp_path / "sweep/summary.csv")] == ["completed"]
    assert (tmp_path / "sweep/.submitit").is_dir()  # it really went through submitit


def test_slurm_launcher_config_composes():
    _plugin("hydra_submitit_launcher", "hydra-submitit-launcher")
    cfg = compose_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.timeout_min == 240 and launcher.submitit_folder.endswith("/.submitit/%j")


# ---- experiment presets ---------------------------------------------------------------------------------------------

PRESETS = sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml"))


def test_every_required_preset_exists():
    assert {"cifar10_resnet18", "finetune_imagefolder", "prune_resnet18", "ensemble_digits"} <= set(PRESETS)
    for name in PRESETS:
        text = (ROOT / "configs/experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_") and "Source" in text, name


@pytest.mark.parametrize("name", PRESETS)
def test_every_experiment_preset_composes_and_validates(name, tmp_path):
    (tmp_path / "train").mkdir()  # validation checks that data.root exists (it loads nothing)
    extra = (
        [f"data.root={tmp_path}"]
        if name in ("finetune_imagefolder", "cifar10_resnet18", "seed_finetune_cifar10")
        else []
    )
    cfg = compose_config(f"experiment={name}", *extra)
    validate(cfg)
    smoke = compose_config(f"experiment={name}", "debug=smoke", *extra)
    assert smoke.trainer.epochs == 1  # debug comes after experiment: it shrinks any recipe


def test_cifar10_resnet18_is_the_published_recipe():
    cfg = compose_config("experiment=cifar10_resnet18")
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 5e-4)
    assert cfg.scheduler._target_.endswith("CosineAnnealingLR") and cfg.scheduler.T_max == 200
    assert cfg.trainer.epochs == 200 and cfg.data.batch_size == 128 and cfg.data.name == "cifar10"
    assert [t._target_.rsplit(".", 1)[-1] for t in cfg.augmentation.train] == ["RandomCrop", "RandomHorizontalFlip"]
    assert cfg.augmentation.train[0].padding == 4 and cfg.model.small_input is True


def test_ensemble_digits_preset_runs(tmp_path):
    summary = run_in_process(
        tmp_path, "experiment=ensemble_digits", "debug=smoke", "model.width=8", "trainer.threads=1"
    )
    assert summary["status"] == "completed" and "ensemble" in summary


# ---- quality gates --------------------------------------------------------------------------------------------------


def test_gate_miss_exits_3_and_a_met_gate_exits_0(tmp_path):
    missed = shelltrain_forked(*TINY, "gate.test_acc_min=0.99", "hydra.run.dir=missed", cwd=tmp_path)
    assert missed.returncode == 3, missed.stderr
    line = missed.stderr.strip().splitlines()[-1]
    assert line.startswith("shelltrain: gate missed: test_acc=") and "< gate.test_acc_min=0.99" in line
    record = json.loads((tmp_path / "missed/summary.json").read_text())
    assert record["gates"]["passed"] is False and record["status"] == "completed"
    met = shelltrain_forked(*TINY, "gate.test_acc_min=0.01", "gate.params_max=1e6", "hydra.run.dir=met", cwd=tmp_path)
    assert met.returncode == 0, met.stderr
    assert "quality gates passed: test_acc=" in met.stdout
    assert json.loads((tmp_path / "met/summary.json").read_text())["gates"]["passed"] is True


def test_gate_check_reads_headline_and_section_metrics():
    summary = {"test_acc": 0.95, "params": 1000, "cv": {"mean": 0.9, "std": 0.02}, "status": "completed"}
    verdict = gates.check({"test_acc_min": 0.9, "params_max": 500, "cv_mean_min": 0.91, "cv_std_max": None}, summary)
    assert verdict["passed"] is False
    assert verdict["failures"] == ["params=1000 > gate.params_max=500", "cv_mean=0.9 < gate.cv_mean_min=0.91"]
    assert verdict["checked"]["test_acc_min"] == {
        "limit": 0.9,
        "value": 0.95,
        "passed": True,
        "text": "test_acc=0.95 >= 0.9",
    }
    assert "cv_std_max" not in verdict["checked"]  # null: not set
    missing = gates.check({"sparsity_min": 0.5}, summary)
    assert missing["failures"] == ["gate.sparsity_min=0.5: the run reported no numeric 'sparsity'"]
    assert gates.check({}, summary)["passed"] and not gates.active({"test_acc_min": None})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["gate.test_acc_min=0.9", "gate.test_acc_max=0.5"], "gate.test_acc_min=0.9 > gate.test_acc_max=0.5"),
        (["+gate.test_acc=0.9"], "a gate key is <metric>_min or <metric>_max"),
        (["gate.test_acc_min=true"], "a gate limit is a number"),
        (["cv.folds=1"], "cv.folds=1 is invalid; use 0 (off) or a number of folds >= 2"),
        (["cv.folds=3", "trainer.epochs=0", "scheduler=none"], "cv.folds needs trainer.epochs > 0"),
        (["trainer.loss=mse", "trainer.label_smoothing=0.1"], "applies to trainer.loss=cross_entropy only"),
        (["trainer.loss=mse", "augmentation.mixup_alpha=0.2"], "mixup/cutmix needs trainer.loss=cross_entropy"),
        (["scheduler=onecycle", "trainer.epochs=0"], "scheduler needs trainer.epochs > 0"),
        (["scheduler=plateau", "scheduler.interval=step"], "set scheduler.interval=epoch"),
        (["model=torchvision", "model.name=shufflenet_v2_x1_0", "prune.name=structured"], "prune=structured cannot"),
    ],
)
def test_cross_field_checks_fail_before_any_data_is_loaded(overrides, message):
    with pytest.raises(UserError, match=None) as info:
        validate(compose_config(*overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


# ---- cross-validation -----------------------------------------------------------------------------------------------


def test_cv_folds_partition_the_train_split_stratified():
    from shelltrain.data import build_data, cv_fold

    cfg = compose_config("model=cnn", "augmentation=basic")
    bundle = build_data(cfg.data, cfg.augmentation, seed=0)
    train = bundle.train.dataset
    labels = train.labels.numpy()
    held_out = []
    for k in range(3):
        fold = cv_fold(bundle, folds=3, fold=k, seed=0)
        train_idx, val_idx = set(fold.train.dataset.indices), set(fold.val.dataset.indices)
        assert not train_idx & val_idx and len(train_idx | val_idx) == len(labels)
        assert fold.train.dataset.dataset is train  # trains with the augmented train transform
        assert fold.val.dataset.dataset.transform is bundle.val.dataset.transform  # validates without it
        assert fold.test is bundle.test
        counts = np.bincount(labels[sorted(val_idx)], minlength=10)
        assert np.all(np.abs(counts - np.bincount(labels, minlength=10) / 3) <= 1)  # stratified
        held_out += sorted(val_idx)
    assert sorted(held_out) == list(range(len(labels)))  # every train image is held out exactly once
    with pytest.raises(UserError, match="cv.folds=2000"):
        cv_fold(bundle, folds=2000, fold=0, seed=0)


def test_cv_run_reports_fold_scores_mean_and_std(tmp_path):
    result = shelltrain_forked(
        "model=cnn",
        "model.width=8",
        "cv.folds=3",
        "debug=smoke",
        "trainer.device=cpu",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    cv = json.loads((tmp_path / "run/summary.json").read_text())["cv"]
    assert cv["folds"] == 3 and len(cv["scores"]) == 3 and cv["metric"] == "best_val_acc"
    assert cv["mean"] == pytest.approx(np.mean(cv["scores"])) and cv["std"] == pytest.approx(np.std(cv["scores"]))
    for k, score in enumerate(cv["scores"]):
        fold = json.loads((tmp_path / f"run/cv/fold_{k}/summary.json").read_text())
        assert fold["best_val_acc"] == pytest.approx(score)
    assert (tmp_path / "run/checkpoints/best.pt").is_file()  # refit: the final model on the whole train split
    assert "cross-validation" in result.stdout and "mean ± std" in result.stdout
    assert f"cv val_acc: {cv['mean']:.4f} ± {cv['std']:.4f} over 3 folds" in result.stdout


def test_cv_score_is_what_a_sweep_selects_by(tmp_path):
    from shelltrain.jobs import run

    cfg = compose_config(*TINY, "cv.folds=2", "cv.refit=false")
    with open_dict(cfg):
        del cfg["hydra"]  # a job's config, as the CLI hands it to the runner
    returned = run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert returned == pytest.approx(summary["cv"]["mean"])
    assert summary["test_acc"] == pytest.approx(summary["cv"]["test_acc_mean"])
    assert not (tmp_path / "checkpoints").exists()  # no refit: only the fold models
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/overrides.yaml").write_text("- cv.folds=2\n")
    row = sweep_table.read_run(tmp_path)
    assert row.score == pytest.approx(summary["cv"]["mean"])


# ---- CI -------------------------------------------------------------------------------------------------------------


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci/run").read_text().splitlines()
    install = next(line for line in ci if line.startswith('pip install -e ".[test,'))  # with the extras CI tests
    commands = " && ".join(ci[ci.index(install) :])  # what CI runs from the install on, in order
    assert commands.endswith("&& pytest")
    assert commands in (ROOT / "README.md").read_text()


def test_ci_example_workflow_runs_smoke_and_gates():
    workflow = yaml.safe_load((ROOT / "examples/ci/shelltrain.yml").read_text())
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any("shelltrain" in s and "debug=smoke" in s for s in steps)
    assert any("shelltrain" in s and "gate.test_acc_min=" in s for s in steps)


def test_summary_of_a_sweep_with_wrongly_typed_files_is_a_table_not_a_traceback(tmp_path):
    d = _fake_sweep(tmp_path)
    failures = {"passed": False, "failures": [1, 2]}
    _fake_run(d, 0, ["x=1"], {"status": "completed", "best_val_acc": 0.5, "gates": failures})
    _fake_run(d, 1, ["x=2"], {"status": "completed", "best_val_acc": 0.6})
    (d / "1/summary.json").write_text("[1, 2]")
    (d / "0/.hydra/config.yaml").write_text("- 1\n")
    assert sweep.main([str(d)]) == 4
    assert [r["status"] for r in _csv(d / "summary.csv")] == ["completed", "unreadable"]
