"""The compression pipeline (experiment=compress_digits) shrunk to tiny settings: every stage runs as a sub-run,
the table holds one row per model, and the students reload from their checkpoints with weights_only=True and
reproduce the test accuracy the table reports."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_in_process
from omegaconf import OmegaConf

from shelltrain.data import build_data
from shelltrain.engine import evaluate
from shelltrain.models import build_model
from shelltrain.prune import rebuild
from shelltrain.runner import train_settings
from shelltrain.silence import quiet

TINY = [
    "experiment=compress_digits",
    "debug=smoke",
    "data.limit_samples=200",
    "compress.teacher.model.name=cnn",  # the chain, not the teacher's size, is under test
    "compress.teacher.model.width=8",
    "compress.teacher.ensemble.members=2",
    "compress.teacher.trainer.epochs=1",
    "compress.prune.finetune_epochs=1",
    "compress.export=torchscript",  # needs no onnx
    "compress.latency.batch=4",
    "compress.latency.repeats=2",
    "plots=true",
]


def reloaded_test_acc(run_dir) -> float:
    """A sub-run's model as any consumer rebuilds it: best.pt read with weights_only=True, the architecture from
    its config (and pruning history), then evaluated on the test split the run used."""
    with quiet():
        ckpt = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    cfg = OmegaConf.create(ckpt["config"])
    data = build_data(cfg.data, cfg.augmentation, seed=cfg.trainer.seed)
    model = rebuild(build_model(cfg.model, data.num_classes, data.in_channels), ckpt)
    model.load_state_dict(ckpt["model"])
    settings = train_settings(cfg.trainer, torch.device("cpu"))
    return evaluate(model.eval(), data.test, settings, limit=cfg.trainer.limit_test_batches)["acc"]


@pytest.mark.slow
def test_compress_pipeline_writes_one_table_and_its_students_reload(tmp_path):
    summary = run_in_process(tmp_path, *TINY)
    report = json.loads((tmp_path / "compress.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == [
        "teacher ensemble",
        "member 0",
        "member 1",
        "student alone",
        "distilled student",
        "pruned",
        "int8",
    ]
    assert summary["compress"] == report["rows"] and summary["test_acc"] == rows["int8"]["test_acc"]
    assert rows["student alone"]["params"] == rows["distilled student"]["params"]  # the same architecture
    assert rows["pruned"]["params"] < rows["distilled student"]["params"]
    assert rows["pruned"]["macs"] < rows["distilled student"]["macs"]
    assert rows["teacher ensemble"]["params"] == 2 * rows["member 0"]["params"]
    assert all(row["latency_ms"] > 0 and row["size_bytes"] > 0 for row in rows.values())
    assert (tmp_path / "plots/compress.png").stat().st_size > 0
    assert report["export"]["pruned"]["max_abs_diff"] <= 1e-4
    stages = tmp_path / "compress"
    distilled = torch.load(stages / "distilled/checkpoints/best.pt", weights_only=True)["config"]["distill"]
    assert (distilled["name"], distilled["teacher"]) == ("logits", str(stages / "teacher"))  # the ensemble taught
    for stage, name in (("distilled", "distilled student"), ("pruned", "pruned"), ("int8", "int8")):
        assert reloaded_test_acc(stages / stage) == rows[name]["test_acc"], stage


def _files(folder) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_an_interrupted_compress_chain_resumes_stage_by_stage(tmp_path, monkeypatch):
    """SIGINT in the distilled stage (steps 1-4 train the teacher's two members, 5-6 the student alone): the chain
    stops naming its own run directory; resumed, the finished stages are kept byte for byte and the distilled one
    continues from its checkpoint."""
    from conftest import interrupt_at_step

    from shelltrain.errors import Interrupted

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 7, "sigint")
        with pytest.raises(Interrupted) as stopped:
            run_in_process(tmp_path, *TINY, "plots=false")
    assert stopped.value.run_dir == tmp_path.absolute()  # the resume command names the chain, not a stage
    stages = tmp_path / "compress"
    assert (stages / "distilled/checkpoints/last.pt").is_file()
    assert json.loads((stages / "distilled/summary.json").read_text())["status"] == "interrupted"
    finished = {stage: _files(stages / stage) for stage in ("teacher", "student")}

    run_in_process(tmp_path, *TINY, "plots=false", f"trainer.resume={tmp_path}")  # as the printed command does
    assert {stage: _files(stages / stage) for stage in finished} == finished
    report = json.loads((tmp_path / "compress.json").read_text())
    assert [row["name"] for row in report["rows"]][-2:] == ["pruned", "int8"]
    assert all(row["latency_ms"] > 0 and row["latency_spread"] >= 0 for row in report["rows"])  # median and spread
    distilled = json.loads((stages / "distilled/summary.json").read_text())
    assert distilled["status"] == "completed" and distilled["epochs_completed"] == 1
