"""The essay's own example as a preset, timm models and MLflow tracking (optional extras: those tests skip with
the reason when the extra is missing)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import compose_config, run_in_process, shelltrain, shelltrain_forked
from fixtures_data import make_cifar10
from test_transfer import plant_torchvision_weights

from shelltrain.errors import UserError
from shelltrain.finetune import FinetunePolicy
from shelltrain.models import build_model
from shelltrain.optim import build_optimizer
from shelltrain.schema import validate

# --- experiment=seed_finetune_cifar10 + checkpoint.export_state_dict ------------------------------------------


@pytest.mark.slow  # a ResNet-18 run: ~30 s on 2 shared cores
def test_seed_finetune_cifar10_writes_a_plain_state_dict_for_torchvision_resnet18(tmp_path, monkeypatch):
    planted = plant_torchvision_weights(tmp_path / "torch", monkeypatch, "resnet18")
    root = make_cifar10(tmp_path / "data", n_train=160, n_test=40, monkeypatch=monkeypatch)
    summary = run_in_process(
        tmp_path / "run", "experiment=seed_finetune_cifar10", "debug=smoke", f"data.root={root}", "data.batch_size=16"
    )
    assert summary["status"] == "completed"
    assert summary["transfer"]["preprocessing"]["from"] != "weights"  # ToTensor only: 32x32, no normalisation
    state = torch.load(tmp_path / "run/checkpoints/model.pth", weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state.values())  # a plain state dict, nothing else
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(state)  # strict: every key and shape of torchvision's resnet18 with a 10-class head
    best = torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)["model"]
    assert all(torch.equal(state[key], best[key]) for key in state)  # the model the run stands for
    assert not torch.equal(state["conv1.weight"], torch.zeros_like(state["conv1.weight"]))
    assert planted["conv1.weight"].shape == state["conv1.weight"].shape


def test_seed_finetune_cifar10_is_the_essays_script():
    cfg = compose_config("experiment=seed_finetune_cifar10")
    assert (cfg.model.name, cfg.model.weights, cfg.model.small_input) == ("resnet18", "IMAGENET1K_V1", False)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.batch_size) == ("cifar10", 32, 64)
    assert list(cfg.data.mean) == [0.0] * 3 and list(cfg.data.std) == [1.0] * 3 and list(cfg.augmentation.train) == []
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0
    assert cfg.scheduler._target_ is None and cfg.trainer.epochs == 10 and cfg.trainer.loss == "cross_entropy"
    assert cfg.checkpoint.export_state_dict == "model.pth"


def test_export_state_dict_is_off_by_default_and_a_path_is_refused(tmp_path):
    run_in_process(tmp_path / "run", "model=cnn", "model.width=8", "data.image_size=16", "debug=smoke")
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["best.pt", "last.pt"]
    with pytest.raises(UserError, match=r"checkpoint.export_state_dict='a/model.pth' is invalid; give a file name"):
        validate(compose_config("checkpoint.export_state_dict=a/model.pth"))


# --- timm models ------------------------------------------------------------------------------------------------

TIMM = ["model=timm", "model.name=test_resnet", "data.image_size=32", "debug=smoke", "trainer.threads=1"]


def plant_timm_weights(path, name: str = "test_resnet") -> dict[str, torch.Tensor]:
    """A seeded 1000-class state dict of a timm model, as timm's hub file would hold it (no network here)."""
    timm = pytest.importorskip("timm", reason='timm is an optional extra: pip install "shelltrain[timm]"')
    torch.manual_seed(5)
    state = timm.create_model(name, pretrained=False).state_dict()
    torch.save(state, path)
    return state


def test_timm_model_finetunes_from_a_planted_file_prunes_structurally_and_exports(tmp_path):
    planted = plant_timm_weights(tmp_path / "pretrained.pth")
    summary = run_in_process(
        tmp_path / "run",
        *TIMM,
        "model.weights=timm",
        f"model.pretrained_file={tmp_path / 'pretrained.pth'}",
        "data.mean=null",
        "data.std=null",
        "finetune.layer_decay=0.8",
        "prune=structured",
        "prune.finetune_epochs=1",
    )
    transfer = summary["transfer"]
    assert transfer["preprocessing"]["from"] == "weights"  # timm.data.resolve_data_config's mean/std
    assert transfer["preprocessing"]["std"] == pytest.approx([0.5])  # test_resnet's (0.5, 0.5, 0.5), grey: one value
    assert transfer["head"]["replaced"] and transfer["head"]["to_classes"] == 10
    lr_groups = [group["name"] for group in transfer["finetune"]["lr_groups"]]
    assert lr_groups[:2] == ["fc", "layer4.0"] and len(lr_groups) == 6  # timm's own layers, the head's first
    assert summary["prune_method"] == "structured" and summary["params"] == summary["prune_params"]  # best.pt's count
    assert summary["prune_params"] < summary["prune"]["before"]["params"] / 2
    unpruned = torch.load(tmp_path / "run/checkpoints/unpruned.pt", weights_only=True)["model"]
    assert unpruned["conv1.0.weight"].shape[1] == 1  # grey digits: the stem adapted from the planted RGB one
    assert torch.allclose(unpruned["conv1.0.weight"], planted["conv1.0.weight"].sum(1, keepdim=True), atol=0.5)
    exported = run_in_process(
        tmp_path / "export", "task=export", f"model.weights={tmp_path / 'run'}", "export.format=torchscript"
    )
    assert exported["status"] == "completed"
    assert list((tmp_path / "export").glob("*.pt"))


def test_unknown_timm_name_is_one_line_with_close_names(tmp_path):
    pytest.importorskip("timm", reason='timm is an optional extra: pip install "shelltrain[timm]"')
    with pytest.raises(UserError, match=r"model.name='convnext_ato' is not a timm model; did you mean convnext_atto"):
        run_in_process(tmp_path, "model=timm", "model.name=convnext_ato", "debug=smoke")


def test_finetune_layer_decay_takes_timms_own_layers_and_decays_from_head_to_stem():
    pytest.importorskip("timm", reason='timm is an optional extra: pip install "shelltrain[timm]"')
    from timm.optim import param_groups_layer_decay

    cfg = compose_config("model=timm", "model.name=test_convnext", "finetune=layer_decay", "optimizer.lr=0.1")
    assert (cfg.finetune.policy, cfg.finetune.layer_decay) == ("full", 0.75)
    model = build_model(cfg.model, 10, 3)
    groups = FinetunePolicy(model, cfg.finetune).param_groups()
    # timm's group_matcher: the head's layer (its norm and fc) first, then the stages' blocks, the stem last
    assert [g["name"] for g in groups][:3] == ["head", "stages.3.blocks.1", "stages.3"]
    assert groups[-1]["name"] == "stem"
    assert [g["lr_mult"] for g in groups] == pytest.approx([0.75**depth for depth in range(len(groups))])
    ours = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    theirs = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model, layer_decay=0.75) for p in g["params"]}
    assert ours == pytest.approx(theirs) and len(ours) == len(list(model.parameters()))  # every parameter, timm's scale
    optimizer = build_optimizer(cfg.optimizer, model, groups)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1 * 0.75 ** (len(groups) - 1))
    assert all(upper > lower for upper, lower in zip(lrs, lrs[1:]))


# --- logger=mlflow ----------------------------------------------------------------------------------------------

MLFLOW_EXTRA = 'mlflow is an optional extra: pip install "shelltrain[mlflow]"'
CNN = ["model=cnn", "model.width=8", "data.image_size=16", "debug=smoke", "plots=false", "scheduler=none"]


def mlflow_store(tmp_path) -> tuple[list[str], object, str]:
    """Overrides that log to a SQLite store under tmp_path, the MlflowClient reading it back, and its URI."""
    client_module = pytest.importorskip("mlflow.tracking", reason=MLFLOW_EXTRA)
    uri = f"sqlite:///{tmp_path / 'outputs/mlflow.db'}"
    return ["logger=[csv,mlflow]", f"logger.mlflow.tracking_uri={uri}"], client_module.MlflowClient(uri), uri


def runs_of(client) -> list:
    experiment = client.get_experiment_by_name("shelltrain")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_mlflow_records_params_every_epoch_tags_and_artifacts(tmp_path):
    overrides, client, _ = mlflow_store(tmp_path)
    run_in_process(tmp_path / "run", *CNN, *overrides, "trainer.epochs=3", "optimizer.lr=0.03")
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.data.tags["run_dir"] == str((tmp_path / "run").absolute())
    assert run.data.params["optimizer.lr"] == "0.03" and run.data.params["model.name"] == "cnn"
    for key in ("train_loss", "val_acc", "val_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert "summary.test_acc" in run.data.metrics
    assert {"summary.json", "metrics.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "outputs/mlartifacts").is_dir()  # artifacts beside the database


def test_mlflow_resumed_run_continues_the_same_run(tmp_path):
    overrides, client, _ = mlflow_store(tmp_path)
    run_in_process(tmp_path / "run", *CNN, *overrides, "trainer.epochs=2")
    run_in_process(tmp_path / "run", *CNN, *overrides, "trainer.epochs=3", f"trainer.resume={tmp_path / 'run'}")
    (run,) = runs_of(client)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("how, status", [("sigint", "KILLED"), ("crash", "FAILED")])
def test_mlflow_run_of_an_interrupted_or_failed_job_is_ended_not_left_running(tmp_path, monkeypatch, how, status):
    """A run stopped by a signal ends KILLED (tag: interrupted) and continues as RUNNING, then FINISHED, when the
    run dir is resumed; a run that raised ends FAILED."""
    from conftest import interrupt_at_step

    from shelltrain.errors import Interrupted

    overrides, client, _ = mlflow_store(tmp_path)
    interrupt_at_step(monkeypatch, 2, how)
    with pytest.raises(Interrupted if how == "sigint" else RuntimeError):
        run_in_process(tmp_path / "run", *CNN, *overrides, "trainer.epochs=2")
    (run,) = runs_of(client)
    assert run.info.status == status
    assert run.data.tags["status"] == ("interrupted" if how == "sigint" else "failed")
    if how == "sigint":
        monkeypatch.undo()
        run_in_process(tmp_path / "run", *CNN, *overrides, "trainer.epochs=2", f"trainer.resume={tmp_path / 'run'}")
        (run,) = runs_of(client)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"


def test_mlflow_sweep_is_one_parent_with_a_child_per_job(tmp_path):
    overrides, client, _ = mlflow_store(tmp_path)
    swept = shelltrain_forked("-m", *CNN, *overrides, "trainer.device=cpu", "trainer.seed=0,1", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    runs = runs_of(client)
    parents = [r for r in runs if r.data.tags.get("shelltrain.parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["trainer.seed"] for c in children) == ["0", "1"]


def _log_one_run(uri: str, run_dir: str, start, failed) -> None:
    """In a forked process: one shelltrain run's whole MLflow life on the shared store, begun with the others."""
    from shelltrain.mlflow_logger import MLflowLogger

    start.wait(60)
    try:
        logger = MLflowLogger(Path(run_dir), tracking_uri=uri)
        logger.start({"trainer": {"seed": 0}})
        logger.on_epoch_end(None, {"epoch": 1, "val_acc": 0.5}, True)
        logger.finish({"status": "completed", "test_acc": 0.5})
    except BaseException as exc:
        failed.put(f"{type(exc).__name__}: {exc}")
        raise


def test_four_runs_started_at_once_on_a_new_mlflow_store_all_succeed(tmp_path):
    client_module = pytest.importorskip("mlflow.tracking", reason=MLFLOW_EXTRA)
    uri = f"sqlite:///{tmp_path / 'outputs/mlflow.db'}"  # not created yet: the four runs race to create it
    context = multiprocessing.get_context("fork")  # these children only talk to MLflow: no autograd, no OpenMP
    start, failed = context.Barrier(4), context.SimpleQueue()
    runs = [
        context.Process(target=_log_one_run, args=(uri, str(tmp_path / f"run{i}"), start, failed)) for i in range(4)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(180)
    assert failed.empty(), failed.get()
    assert [run.exitcode for run in runs] == [0, 0, 0, 0]
    finished = runs_of(client_module.MlflowClient(uri))
    assert len(finished) == 4 and {run.info.status for run in finished} == {"FINISHED"}


@pytest.mark.parametrize("damage", ["not a database", "read-only"])
def test_a_bad_mlflow_store_file_is_one_line_before_training(tmp_path, damage):
    pytest.importorskip("mlflow.tracking", reason=MLFLOW_EXTRA)
    store = tmp_path / "outputs/mlflow.db"
    store.parent.mkdir()
    store.write_bytes(b"this is not an sqlite database" * 40)
    if damage == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only files")
        store.write_bytes(b"")  # an empty file is a valid, empty SQLite database
        store.chmod(0o444)
    overrides = ["logger=[csv,mlflow]", f"logger.mlflow.tracking_uri=sqlite:///{store}"]
    started = time.monotonic()
    result = shelltrain_forked(*CNN, *overrides, "trainer.device=cpu", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "logger.mlflow.tracking_uri" in line and str(store) in line and damage in line
    assert time.monotonic() - started < 60  # not MLflow's two minutes of retries
    assert not (tmp_path / "run/checkpoints/last.pt").exists()  # said before training


def test_help_shows_how_to_find_timm_names_view_mlflow_and_complete(tmp_path):
    out = shelltrain("--help", cwd=tmp_path).stdout
    assert "model=timm model.name=convnext_atto" in out and "timm.list_models(" in out
    assert "mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db" in out
    assert 'eval "$(shelltrain -sc install=bash)"' in out


# --- logger=wandb (offline) -------------------------------------------------------------------------------------


@pytest.mark.slow  # two wandb processes start: ~25 s on 2 shared cores
def test_wandb_offline_writes_its_run_files_and_a_resume_continues_the_same_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='wandb is an optional extra: pip install "shelltrain[wandb]"')
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [*CNN, "logger=[csv,wandb]", "logger.wandb.mode=offline"]
    run_in_process(tmp_path / "run", *overrides, "trainer.epochs=2", "optimizer.lr=0.03")
    run_id = (tmp_path / "run/wandb_run_id").read_text().strip()
    (first,) = (tmp_path / "run/wandb").glob(f"offline-run-*-{run_id}")
    records = (first / f"run-{run_id}.wandb").read_bytes()
    assert b"val_acc" in records and b"optimizer.lr" in records and b"summary.json" in records
    run_in_process(tmp_path / "run", *overrides, "trainer.epochs=3", f"trainer.resume={tmp_path / 'run'}")
    assert (tmp_path / "run/wandb_run_id").read_text().strip() == run_id
    assert len(list((tmp_path / "run/wandb").glob(f"offline-run-*-{run_id}"))) == 2  # wandb sync merges them
    assert len(list((tmp_path / "run/wandb").glob("offline-run-*"))) == 2  # and no other run
