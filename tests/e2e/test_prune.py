"""Pruning and quantization: the saved model really is sparse, smaller or int8, the report says exactly
what the checkpoint holds, and the checkpoint reloads (weights_only) to the same test accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_in_process, shelltrain_forked
from omegaconf import OmegaConf
from torch import nn

from shelltrain.data import build_data
from shelltrain.engine import evaluate
from shelltrain.errors import UserError
from shelltrain.models import build_model
from shelltrain.prune import rebuild
from shelltrain.prune.layer import removable_blocks
from shelltrain.prune.measure import LatencySpec, layer_weights, measure_latency, parameter_count, sparsity
from shelltrain.runner import train_settings
from shelltrain.schema import validate
from shelltrain.silence import quiet
from shelltrain.trained import open_trained

# Tiny, quick runs: a narrow CNN or a ResNet-18 on 16x16 digits, two batches per split, cheap latency.
QUICK = [
    "trainer.epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "prune.latency_batch=4",
    "prune.latency_repeats=2",
]
CNN = ["model=cnn", "model.width=8", "scheduler=none", "optimizer=adam", "optimizer.lr=0.01", *QUICK]
RESNET = ["model=resnet18", "data.image_size=16", "scheduler=none", *QUICK]


def load_best(run_dir: Path) -> dict:
    with quiet():  # torch.load warns about quantized tensors' storage
        return torch.load(run_dir / "checkpoints/best.pt", weights_only=True)


def reload(run_dir: Path) -> tuple[nn.Module, dict]:
    """What any consumer of a run does: a fresh model from the saved config, rebuilt, then the weights."""
    ckpt = load_best(run_dir)
    cfg = OmegaConf.create(ckpt["config"])
    data = build_data(cfg.data, cfg.augmentation, seed=cfg.trainer.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    model = rebuild(model, ckpt)
    model.load_state_dict(ckpt["model"])
    return model.eval(), {"cfg": cfg, "data": data, "ckpt": ckpt}


def reloaded_test_acc(run_dir: Path) -> float:
    model, ctx = reload(run_dir)
    settings = train_settings(ctx["cfg"].trainer, torch.device("cpu"))
    return evaluate(model, ctx["data"].test, settings, limit=ctx["cfg"].trainer.limit_test_batches)["acc"]


def rebuilt_params(run_dir: Path) -> int:
    """Parameters of the model best.pt holds, rebuilt as every consumer of the run rebuilds it."""
    return parameter_count(open_trained(run_dir).module)


CLASSIFIER = "classifier.2.weight"  # the cnn's final classifier: no prune method touches it unless named


def checkpoint_sparsity(state_dict: dict, classifier: bool = True) -> float:
    """Zeros / elements of every conv and linear weight (the 2-D and 4-D weights) in a state dict; with
    `classifier=False` over the layers the methods prune by default (all but the classifier)."""
    weights = [
        v
        for k, v in state_dict.items()
        if k.endswith("weight") and v.ndim in (2, 4) and (classifier or k != CLASSIFIER)
    ]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def prunable_share(state_dict: dict) -> float:
    """The share of conv/linear weights outside the classifier: a target sparsity times this is the model's."""
    weights = {k: v.numel() for k, v in state_dict.items() if k.endswith("weight") and v.ndim in (2, 4)}
    return 1 - weights[CLASSIFIER] / sum(weights.values())


@pytest.mark.slow
def test_every_option_in_one_multirun(tmp_path):
    result = shelltrain_forked(
        "-m",
        "prune=none,threshold,magnitude,random,structured,quantize",
        "debug=smoke",
        "model=cnn",
        "model.width=8",
        "trainer.device=cpu",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, name in enumerate(["none", "threshold", "magnitude", "random", "structured", "quantize"]):
        run_dir = tmp_path / "sweep" / str(job)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["params"] == rebuilt_params(run_dir), name  # the headline describes best.pt
        if name == "none":
            assert "prune" not in summary and not (run_dir / "prune.json").exists()
            continue
        report = json.loads((run_dir / "prune.json").read_text())
        assert summary["prune"]["method"] == report["method"] == name
        assert summary["prune_params"] == report["after"]["params"]
        assert (run_dir / "checkpoints/unpruned.pt").is_file()
    assert "deprecated" not in (tmp_path / "sweep/4/train.log").read_text()  # torch.ao's warnings are silenced


def test_magnitude_checkpoint_holds_exactly_the_reported_sparsity(tmp_path):
    summary = run_in_process(tmp_path, *CNN, "prune=magnitude", "prune.amount=0.75")
    report = json.loads((tmp_path / "prune.json").read_text())
    state = load_best(tmp_path)["model"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)  # masks made permanent before saving
    assert checkpoint_sparsity(state) == report["after"]["sparsity"] == summary["prune_sparsity"]
    assert 0.75 <= checkpoint_sparsity(state, classifier=False) < 0.7501  # the amount: of the layers it may prune
    assert torch.count_nonzero(state[CLASSIFIER]) == state[CLASSIFIER].numel()  # the classifier stays dense
    assert report["after"]["sparsity"] == pytest.approx(0.75 * prunable_share(state), abs=1e-4)
    # the masks held while fine-tuning: the sparsity right after pruning is the sparsity saved
    assert report["rounds"][0]["sparsity"] == report["after"]["sparsity"]
    assert report["finetune_history"] and report["before"]["params"] == report["after"]["params"]
    per_layer = {row["name"]: row["sparsity"] for row in report["layers"] if row["chosen"]}
    assert len(set(per_layer.values())) > 1  # global ranking: uneven per layer
    classifier = next(row for row in report["layers"] if row["name"] == "classifier.2")
    assert (classifier["chosen"], classifier["changed"], classifier["sparsity"]) == (False, False, 0.0)
    assert reloaded_test_acc(tmp_path) == summary["test_acc"]


def test_iterative_magnitude_reaches_the_target_in_steps(tmp_path):
    run_in_process(
        tmp_path, *CNN, "prune=magnitude", "prune.amount=0.9", "prune.schedule=iterative", "prune.steps=3", "plots=true"
    )
    report = json.loads((tmp_path / "prune.json").read_text())
    assert (tmp_path / "plots/prune_tradeoff.png").stat().st_size > 0  # accuracy vs size and latency, per step
    assert [r["target"] for r in report["rounds"]] == pytest.approx([0.3, 0.6, 0.9])
    state = load_best(tmp_path)["model"]
    share = prunable_share(state)  # the classifier stays dense: the model's sparsity is the target times this
    assert [r["sparsity"] for r in report["rounds"]] == pytest.approx([0.3 * share, 0.6 * share, 0.9 * share], abs=1e-3)
    assert 0.9 <= checkpoint_sparsity(state, classifier=False) < 0.9001
    assert len(report["finetune_history"]) == 3  # one epoch per round


def test_local_magnitude_prunes_every_layer_to_the_amount(tmp_path):
    run_in_process(
        tmp_path, *CNN, "prune=magnitude", "prune.amount=0.5", "prune.global=false", "prune.finetune_epochs=0"
    )
    report = json.loads((tmp_path / "prune.json").read_text())
    for row in report["layers"]:
        assert row["sparsity"] == (pytest.approx(0.5, abs=0.02) if row["name"] != "classifier.2" else 0.0)
    assert report["accuracy"]["pruned"] == report["accuracy"]["finetuned"]


def test_threshold_zeroes_exactly_the_small_weights(tmp_path):
    run_in_process(tmp_path, *CNN, "prune=threshold", "prune.threshold=0.05", "prune.finetune_epochs=0")
    before = torch.load(tmp_path / "checkpoints/unpruned.pt", weights_only=True)["model"]
    after = load_best(tmp_path)["model"]
    for key, w in before.items():
        if key.endswith("weight") and w.ndim in (2, 4) and key != CLASSIFIER:
            assert torch.equal(after[key], torch.where(w.abs() < 0.05, torch.zeros_like(w), w))
    assert torch.equal(after[CLASSIFIER], before[CLASSIFIER])  # the classifier: untouched


def test_random_pruning_is_a_seeded_baseline(tmp_path):
    a = run_in_process(tmp_path / "a", *CNN, "prune=random", "prune.amount=0.6", "prune.finetune_epochs=0")
    b = run_in_process(tmp_path / "b", *CNN, "prune=random", "prune.amount=0.6", "prune.finetune_epochs=0")
    wa, wb = load_best(tmp_path / "a")["model"], load_best(tmp_path / "b")["model"]
    assert a["prune_sparsity"] == b["prune_sparsity"] and checkpoint_sparsity(wa, classifier=False) >= 0.6
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_structured_removes_channels_and_reloads_exactly(tmp_path):
    summary = run_in_process(tmp_path, *RESNET, "prune=structured", "prune.ratio=0.5", "prune.finetune_epochs=1")
    report = json.loads((tmp_path / "prune.json").read_text())
    ckpt = load_best(tmp_path)
    assert ckpt["model"]["layer1.0.conv1.weight"].shape[0] == 32  # 64 channels, half removed
    assert ckpt["model"]["fc.weight"].shape == (10, 256)  # the classifier follows, its outputs stay
    assert report["details"]["widths"]["layer2.0.conv1"] == [128, 64]
    assert report["change"]["params"] < 0.3 and report["change"]["macs"] < 0.35
    assert report["after"]["sparsity"] < 0.01  # fewer channels, not zeros
    assert isinstance(ckpt["pruning"]["ops"][0]["history"], list)
    assert reloaded_test_acc(tmp_path) == summary["test_acc"]


def test_structured_schedules_and_importances(tmp_path):
    for i, extra in enumerate(
        [
            ["prune.schedule=iterative", "prune.steps=2", "prune.importance=taylor"],
            ["prune.schedule=hierarchical", "prune.importance=bn_scale"],
            ["prune.schedule=adaptive", "prune.max_acc_drop=0.5", "prune.importance=fpgm"],
            ["prune.global=true", "prune.importance=l2"],
        ]
    ):
        run_dir = tmp_path / str(i)
        summary = run_in_process(run_dir, *CNN, "prune=structured", "prune.finetune_epochs=0", *extra)
        report = json.loads((run_dir / "prune.json").read_text())
        assert report["change"]["params"] < 1.0, extra
        assert reloaded_test_acc(run_dir) == summary["test_acc"], extra
    hierarchical = json.loads((tmp_path / "1/prune.json").read_text())
    groups = [g["group"] for g in hierarchical["details"]["groups"]]
    assert groups == ["features.8", "features.4", "features.0"]  # output end first; the classifier stays
    adaptive = json.loads((tmp_path / "2/prune.json").read_text())["details"]
    assert set(adaptive["sensitivity"]) == set(adaptive["amounts"]) and adaptive["why"]


def test_unstructured_hierarchical_and_adaptive_report_their_choices(tmp_path):
    run_in_process(tmp_path / "h", *CNN, "prune=magnitude", "prune.schedule=hierarchical", "prune.amount=0.5")
    report = json.loads((tmp_path / "h/prune.json").read_text())
    groups = [r["round"].split()[1] for r in report["rounds"]]
    assert groups == ["features.8", "features.4", "features.0"]  # output end first; the classifier stays
    assert checkpoint_sparsity(load_best(tmp_path / "h")["model"], classifier=False) == pytest.approx(0.5, abs=0.01)

    run_in_process(
        tmp_path / "a",
        *CNN,
        "prune=magnitude",
        "prune.schedule=adaptive",
        "prune.amount=0.9",
        "prune.max_acc_drop=0.02",
    )
    adaptive = json.loads((tmp_path / "a/prune.json").read_text())
    details = adaptive["details"]
    assert set(details["sensitivity"]) == {"features.0", "features.4", "features.8"}  # not the classifier
    # the outcome: pruned to the chosen amounts, the validation accuracy right after pruning kept within budget
    accuracy = adaptive["accuracy"]
    assert accuracy["before"]["val"] - accuracy["pruned"]["val"] <= 0.02
    state = load_best(tmp_path / "a")["model"]
    for layer, amount in details["amounts"].items():
        weight = state[f"{layer}.weight"]
        zeros = int((weight == 0).sum())
        assert amount * weight.numel() - 1 <= zeros <= amount * weight.numel() + 1, (layer, amount)
    assert any(details["amounts"].values())  # this CNN has room to prune within a 2-point budget


@pytest.mark.slow
def test_layer_pruning_removes_residual_blocks_and_reloads(tmp_path):
    summary = run_in_process(
        tmp_path, *RESNET, "prune=layer", "prune.blocks=2", "prune.schedule=iterative", "prune.finetune_epochs=1"
    )
    report = json.loads((tmp_path / "prune.json").read_text())
    removed = report["details"]["removed"]
    assert len(removed) == 2 and set(removed) <= {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    assert [c["block"] for c in report["details"]["choices"]] == removed
    state = load_best(tmp_path)["model"]
    assert not any(k.startswith(f"{removed[0]}.") for k in state)
    assert report["change"]["params"] < 1.0 and report["change"]["macs"] < 1.0
    assert reloaded_test_acc(tmp_path) == summary["test_acc"]
    assert summary["params"] == rebuilt_params(tmp_path) < report["before"]["params"]

    run_in_process(
        tmp_path / "a",
        *RESNET,
        "prune=layer",
        "prune.schedule=adaptive",
        "prune.max_acc_drop=0.0",
        "prune.finetune_epochs=0",
    )
    details = json.loads((tmp_path / "a/prune.json").read_text())["details"]
    assert all(c["val_drop"] <= 0.0 for c in details["choices"] if "kept" not in c)


def test_removable_blocks_are_the_shape_keeping_residual_blocks():
    model = build_model(compose_config("model=resnet18").model, 10, 3)
    blocks = removable_blocks(model, torch.randn(1, 3, 32, 32))
    assert blocks == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # no downsampling
    cnn = build_model(compose_config("model=cnn").model, 10, 3)
    assert removable_blocks(cnn, torch.randn(1, 3, 32, 32)) == []


def test_static_int8_resnet_is_smaller_and_reloads_exactly(tmp_path):
    summary = run_in_process(tmp_path, *RESNET, "prune=quantize")
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["details"]["mode"] == "static"
    assert report["change"]["size"] < 0.3
    assert report["after"]["checkpoint_bytes"] < 0.3 * (tmp_path / "checkpoints/unpruned.pt").stat().st_size
    assert report["after"]["macs"] == report["before"]["macs"]  # the same operations, in int8
    ckpt = load_best(tmp_path)  # quantized tensors load with weights_only
    assert ckpt["model"]["layer1.0.conv1.weight"].dtype == torch.qint8
    assert reloaded_test_acc(tmp_path) == summary["test_acc"]


def test_dynamic_int8_and_fake_bits_on_a_model_without_a_quantizable_twin(tmp_path):
    summary = run_in_process(tmp_path / "d", *CNN, "prune=quantize")
    report = json.loads((tmp_path / "d/prune.json").read_text())
    assert report["details"]["mode"] == "dynamic"
    assert reloaded_test_acc(tmp_path / "d") == summary["test_acc"]

    run_in_process(tmp_path / "f", *CNN, "prune=quantize", "prune.bits=4")
    assert json.loads((tmp_path / "f/prune.json").read_text())["details"]["mode"] == "fake"
    state = load_best(tmp_path / "f")["model"]
    for key in ("features.4.weight", "classifier.2.weight"):
        for row in state[key].flatten(1):
            assert row.unique().numel() <= 2**4 - 1  # symmetric 4-bit levels per output channel


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prune=threshold", "prune.schedule=adaptive"], "'adaptive' is not available for prune=threshold"),
        (["prune=magnitude", "prune.amount=1.5"], "prune.amount=1.5 is out of range"),
        (["prune=structured", "prune.importance=l3"], "prune.importance='l3' is invalid"),
        (["prune=quantize", "prune.bits=16"], "prune.bits=16 is out of range"),
        (["prune=layer", "prune.blocks=0"], "prune.blocks=0 is out of range"),
        (["prune=structured", "prune.distill_temperature=0"], "prune.distill_temperature=0.0 must be > 0"),
        (["prune=structured", "prune.distill_alpha=2"], "prune.distill_alpha=2.0 is out of range"),
    ],
)
def test_bad_prune_settings_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(*overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=cnn", "prune=layer"], "prune=layer found no removable block in SmallCNN"),
        (["model=cnn", "prune=quantize", "prune.mode=static"], "prune.mode=static needs a model torchvision ships"),
        (["model=cnn", "prune=quantize", "prune.mode=dynamic", "prune.bits=4"], "is int8 only"),
    ],
)
def test_impossible_requests_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_in_process(tmp_path, *[o for o in CNN if not o.startswith("model=")], *overrides)
    assert not (tmp_path / "metrics.csv").exists()  # no epoch was spent


def test_a_list_of_prune_methods_names_prune_then_instead_of_running_only_the_last(tmp_path):
    """Hydra merges prune=[structured,quantize] into quantize alone; the run is refused before training."""
    with pytest.raises(UserError) as refused:
        run_in_process(tmp_path, *CNN, "prune=[structured,quantize]")
    message = str(refused.value)
    assert "prune=structured prune.then=[quantize]" in message and "\n" not in message
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize("method", ["structured", "quantize"])
def test_headline_figures_and_gates_describe_the_saved_pruned_model(tmp_path, capsys, method):
    unpruned = sum(p.numel() for p in build_model(compose_config(*CNN).model, 10, 1).parameters())
    summary = run_in_process(tmp_path, *CNN, f"prune={method}", f"gate.params_max={unpruned - 1}")
    report = json.loads((tmp_path / "prune.json").read_text())
    assert summary["params"] == rebuilt_params(tmp_path) == report["after"]["params"]
    assert report["before"]["params"] == unpruned  # the unpruned figures stay in the prune section
    # structured pruning removes channels and passes the gate; dynamic int8 keeps every parameter and misses it
    assert (summary["params"] < unpruned) == summary["gates"]["passed"] == (method == "structured")
    assert summary["best_val_acc"] == report["accuracy"]["finetuned"]["val"]
    said = capsys.readouterr().out
    assert ("(fine-tuned)" in said) == (method == "structured")  # quantization does not fine-tune
    assert ("(quantize, not fine-tuned)" in said) == (method == "quantize")


# cosine's T_max is ${trainer.epochs}: the fine-tune sizes it by its own epochs (0 here would divide by zero)
@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_epochs_zero_prunes_without_training(tmp_path, capsys, scheduler):
    summary = run_in_process(
        tmp_path, *CNN, "trainer.epochs=0", f"scheduler={scheduler}", "prune=structured", "prune.finetune_epochs=2"
    )
    report = json.loads((tmp_path / "prune.json").read_text())
    assert (
        summary["epochs_completed"] == 0 and summary["prune_params"] == summary["params"] < report["before"]["params"]
    )
    assert summary["best_val_acc"] == report["accuracy"]["finetuned"]["val"]  # the fine-tuned model's, not empty
    assert "(fine-tuned)" in capsys.readouterr().out
    assert (tmp_path / "checkpoints/best.pt").is_file() and not (tmp_path / "checkpoints/unpruned.pt").exists()


def test_rebuild_replays_every_op_and_latency_is_a_median():
    cfg = compose_config("model=resnet18").model
    model = build_model(cfg, 10, 1)
    assert rebuild(model, {"model": {}}) is model  # no pruning entry: unchanged
    layer = {"pruning": {"ops": [{"op": "layer", "removed": ["layer3.1"]}]}, "config": {"data": {"image_size": 32}}}
    model = rebuild(model, layer)
    assert isinstance(model.layer3[1], nn.Identity)
    spec = LatencySpec(batch=2, threads=1, repeats=3, warmup=1)
    threads = torch.get_num_threads()
    small = build_model(compose_config("model=cnn", "model.width=4").model, 10, 1)
    big, tiny = measure_latency([model, small], (1, 32, 32), spec)
    assert big > tiny > 0
    assert torch.get_num_threads() == threads  # restored
    weights = dict(layer_weights(model))
    assert "layer3.1.conv1" not in weights and "fc" in weights
    assert sparsity(model) < 0.01


def test_evaluate_rebuilds_a_structured_pruned_run(tmp_path):
    """task=evaluate on a pruned run: the loader replays the pruning and reproduces the run's test figures."""
    summary = run_in_process(tmp_path / "run", *CNN, "prune=structured", "prune.finetune_epochs=0")
    evaluated = run_in_process(
        tmp_path / "eval", "task=evaluate", f"model.weights={tmp_path / 'run'}", "trainer.limit_test_batches=2"
    )
    assert evaluated["test_acc"] == summary["test_acc"] and evaluated["test_loss"] == summary["test_loss"]
