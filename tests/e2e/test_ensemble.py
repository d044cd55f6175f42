"""Ensembles: the combination rules on hand-made probabilities, vmap against the loop, and the
three member sources (trained here, checkpoints, a sweep) end to end."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision
from conftest import run_in_process, shelltrain_forked

from shelltrain.errors import UserError
from shelltrain.fusion import (
    FusedModel,
    accuracy_weights,
    average,
    fuse,
    member_logits,
    same_architecture,
    vote,
    weighted,
)
from shelltrain.members import _override_set
from shelltrain.models import SmallCNN, count_parameters
from shelltrain.placement import is_quantized
from shelltrain.schema import defaults
from shelltrain.trained import open_trained

# Small and quick, but members good enough (~0.8) that fusing them means something. One thread: on a
# busy machine with few cores, more threads make these tiny models many times slower.
MEMBER = [
    "model=cnn",
    "model.width=8",
    "data.image_size=16",
    "scheduler=none",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "trainer.epochs=2",
    "trainer.limit_train_batches=25",
    "trainer.threads=1",
]
EVAL = ["data.image_size=16", "trainer.epochs=0", "trainer.threads=1"]  # fuse what exists, train nothing
SMOKE = ["debug=smoke", "data.image_size=16", "trainer.threads=1"]


def probs(*rows: list[list[float]]) -> torch.Tensor:
    """M x N x C from one N x C list per member."""
    return torch.tensor(rows, dtype=torch.float64)


# ---- rules --------------------------------------------------------------------------------------


def test_average_and_weighted_fuse_probabilities():
    p = probs([[0.9, 0.1]], [[0.2, 0.8]], [[0.3, 0.7]])
    assert average(p)[0].tolist() == pytest.approx([1.4 / 3, 1.6 / 3])
    assert fuse("average", p, [1 / 3] * 3)[1].tolist() == [1]
    # the first member outweighs the two others together: the weighted ensemble follows it
    assert weighted(p, [0.6, 0.2, 0.2])[0].tolist() == pytest.approx([0.64, 0.36])
    assert weighted(p, [3, 1, 1])[0].tolist() == pytest.approx([0.64, 0.36])  # normalized
    assert fuse("weighted", p, [0.6, 0.2, 0.2])[1].tolist() == [0]


def test_accuracy_weights_normalize_and_sharpen_with_temperature():
    assert accuracy_weights([0.9, 0.6, 0.3]) == pytest.approx([0.5, 1 / 3, 1 / 6])
    squares = [0.81, 0.36, 0.09]
    assert accuracy_weights([0.9, 0.6, 0.3], temperature=0.5) == pytest.approx([s / 1.26 for s in squares])
    assert accuracy_weights([0.9, 0.6], temperature=2.0) == pytest.approx(
        [0.9**0.5 / (0.9**0.5 + 0.6**0.5), 0.6**0.5 / (0.9**0.5 + 0.6**0.5)]
    )
    assert accuracy_weights([0.9, 0.89], temperature=1e-4) == pytest.approx([1.0, 0.0], abs=1e-6)  # no 0/0
    assert accuracy_weights([0.0, 0.0]) == [0.5, 0.5]
    assert accuracy_weights([0.5, float("nan")]) == [1.0, 0.0]


def test_vote_is_a_majority_and_ties_go_to_the_summed_probability():
    # sample 0: 3 votes for class 0 beat the higher summed probability of class 1
    # sample 1: a 2-2 tie of classes 1 and 2; class 2 has the higher summed probability
    # sample 2: a 2-2 tie of classes 0 and 1; class 2 has the highest sum but no vote, so 1 wins
    p = probs(
        [[0.50, 0.49, 0.01], [0.10, 0.60, 0.30], [0.40, 0.25, 0.35]],
        [[0.40, 0.35, 0.25], [0.10, 0.50, 0.40], [0.10, 0.46, 0.44]],
        [[0.40, 0.30, 0.30], [0.00, 0.30, 0.70], [0.40, 0.25, 0.35]],
        [[0.00, 0.99, 0.01], [0.00, 0.45, 0.55], [0.10, 0.46, 0.44]],
    )
    assert vote(p).tolist() == [0, 2, 1]
    assert average(p).argmax(1).tolist()[0] == 1  # averaging would have picked class 1 for sample 0
    fused, preds = fuse("vote", p, [0.25] * 4)
    assert preds.tolist() == [0, 2, 1] and torch.allclose(fused, average(p))  # its loss uses the mean


def test_member_override_sets_in_every_spelling():
    assert _override_set("model=cnn model.width=8") == ["model=cnn", "model.width=8"]
    assert _override_set(["model=resnet18", "model.small_input=true"]) == ["model=resnet18", "model.small_input=true"]
    assert _override_set({"model": "resnet18", "model.small_input": True}) == [
        "model=resnet18",
        "model.small_input=true",
    ]


# ---- vmap -----------------------------------------------------------------------------------------


def _members(count: int, width: int = 8) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    # channels_last, like members fresh from training
    models = [SmallCNN(10, 1, width=width).eval().to(memory_format=torch.channels_last) for _ in range(count)]
    for model in models:  # distinct running statistics, so buffers really are stacked per member
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return models


def test_vmap_evaluation_equals_the_loop_on_cpu():
    x, y = torch.randn(21, 1, 16, 16), torch.randint(0, 10, (21,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    settings = defaults("trainer", epochs=0, device=torch.device("cpu"), channels_last=True)
    models = _members(3)
    assert same_architecture(models) and not same_architecture([*models, _members(1, width=16)[0]])
    loop, targets = member_logits(models, loader, settings, limit=None, stacked=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "performance drop": an op fell back to vmap's slow path
        stacked, stacked_targets = member_logits(models, loader, settings, limit=None, stacked=True)
    assert loop.shape == (3, 21, 10) and torch.equal(targets, y) and torch.equal(stacked_targets, y)
    torch.testing.assert_close(stacked, loop)
    limited, _ = member_logits(models, loader, settings, limit=2, stacked=True)
    torch.testing.assert_close(limited, loop[:, :16])


# ---- end to end ---------------------------------------------------------------------------------


def test_members_trained_in_one_run_then_reused_and_weighted(tmp_path):
    run = tmp_path / "ensemble"
    summary = run_in_process(run, *MEMBER, "ensemble=average", "ensemble.members=3", "trainer.seed=5", "plots=true")
    report = json.loads((run / "ensemble.json").read_text())
    members = report["members"]
    assert [m["origin"] for m in members] == [{"kind": "trained", "seed": s} for s in (5, 6, 7)]
    assert [m["weight"] for m in members] == pytest.approx([1 / 3] * 3)
    assert all(m["epochs_trained"] == 2 and m["test_acc"] > 0.5 for m in members)
    # the acceptance criterion: the ensemble is at least as good as its average member
    mean = sum(m["test_acc"] for m in members) / 3
    assert report["test_acc"] >= mean and report["members_mean_test_acc"] == pytest.approx(mean)
    assert summary["test_acc"] == report["test_acc"] and summary["best_val_acc"] == report["val_acc"]
    assert summary["ensemble"]["rule"] == "average" and len(summary["ensemble"]["members"]) == 3
    assert summary["params"] == sum(m["params"] for m in members) and set(summary["per_class"]) == set("0123456789")
    assert (run / "plots/members.png").is_file() and (run / "plots/confusion_matrix.png").is_file()
    for i, m in enumerate(members):  # each member is a complete sub-run of the same pipeline
        assert m["checkpoint"] == f"members/{i}/checkpoints/best.pt"
        ckpt = torch.load(run / m["checkpoint"], weights_only=True)
        assert ckpt["config"]["trainer"]["seed"] == 5 + i and ckpt["config"]["model"]["name"] == "cnn"
        assert ckpt["config"]["ensemble"]["name"] == "none"  # a member is a plain run
        member = json.loads((run / f"members/{i}/summary.json").read_text())
        assert member["status"] == "completed" and member["test_acc"] == pytest.approx(m["test_acc"])
        assert (run / f"members/{i}/metrics.csv").is_file() and (run / f"members/{i}/plots/curves.png").is_file()

    # ... and an ensemble.checkpoints entry, fused by the other rules
    fused = run_in_process(
        tmp_path / "weighted",
        *EVAL,
        "ensemble=weighted",
        "ensemble.temperature=0.5",
        f"ensemble.checkpoints=[{run}]",
        "ensemble.vmap=true",
    )["ensemble"]
    val_accs = [m["val_acc"] for m in fused["members"]]
    assert fused["evaluation"] == "vmap" and val_accs == [m["val_acc"] for m in members]  # vmap agrees with the loop
    assert fused["weights"] == pytest.approx(accuracy_weights(val_accs, 0.5)) and fused["temperature"] == 0.5
    assert fused["members"][1]["origin"] == {
        "kind": "ensemble",
        "source": str(run),
        "member": 1,
        "was": members[1]["origin"],
    }
    explicit = run_in_process(
        tmp_path / "explicit", *EVAL, "ensemble=weighted", "ensemble.weights=[2,1,1]", f"ensemble.checkpoints=[{run}]"
    )
    assert explicit["ensemble"]["weights"] == [0.5, 0.25, 0.25]
    # an ensemble run directory is evaluated again as it was saved (a weighted one keeps its weights); nothing trains
    reused = run_in_process(tmp_path / "reused", *EVAL, f"model.weights={tmp_path / 'explicit'}")
    assert reused["ensemble"]["rule"] == "weighted" and reused["ensemble"]["weights"] == [0.5, 0.25, 0.25]
    assert reused["test_acc"] == explicit["test_acc"] and not (tmp_path / "reused/checkpoints").exists()
    assert [m["epochs_trained"] for m in reused["ensemble"]["members"]] == [0, 0, 0]


def test_heterogeneous_and_loaded_members_each_go_through_the_pipeline(tmp_path):
    """Two members trained here with their own architectures and two loaded ones (one of them structurally
    pruned) fine-tuned by sub-runs from their checkpoints; fused by a vote (the rule itself is tested above)."""
    run_in_process(tmp_path / "plain", *SMOKE, "model=cnn", "model.width=4")
    run_in_process(
        tmp_path / "pruned",
        *SMOKE,
        "model=cnn",
        "model.width=8",
        "prune=structured",
        "prune.finetune_epochs=0",
        "prune.latency_batch=2",
        "prune.latency_repeats=1",
    )
    pruned = tmp_path / "pruned/checkpoints/best.pt"
    pruned_params = json.loads((tmp_path / "pruned/summary.json").read_text())["prune"]["after"]["params"]
    run = tmp_path / "fused"
    report = run_in_process(
        run,
        *SMOKE,
        "scheduler=none",
        "ensemble=vote",
        "ensemble.members=['model=cnn model.width=4',{model:mobilenet_v3_small,model.dropout:0.1}]",
        f"ensemble.checkpoints=[{tmp_path / 'plain'},{pruned}]",
    )["ensemble"]
    members = report["members"]
    assert [m["model"] for m in members] == ["cnn", "mobilenet_v3_small", "cnn", "cnn"]
    assert members[0]["origin"] == {"kind": "trained", "seed": 0, "overrides": ["model=cnn", "model.width=4"]}
    assert members[1]["origin"]["overrides"] == ["model=mobilenet_v3_small", "model.dropout=0.1"]
    assert [m["origin"]["kind"] for m in members[2:]] == ["checkpoint", "checkpoint"]
    assert [m["epochs_trained"] for m in members] == [1, 1, 1, 1]
    assert report["rule"] == "vote" and report["evaluation"] == "loop"  # different architectures are never stacked
    models = [open_trained(run / f"members/{i}").module for i in range(4)]
    assert isinstance(models[0], SmallCNN) and models[0].features[0].out_channels == 4
    assert isinstance(models[1], torchvision.models.MobileNetV3)
    assert members[0]["params"] < members[1]["params"]
    second = torch.load(run / "members/1/checkpoints/best.pt", weights_only=True)["config"]
    assert second["model"]["name"] == "mobilenet_v3_small" and second["model"]["dropout"] == 0.1
    assert second["trainer"]["seed"] == 1 and second["data"]["image_size"] == 16  # the run's own overrides apply
    # the pruned member is fine-tuned from its checkpoint and keeps its smaller architecture and its record
    assert members[3]["params"] == pruned_params < count_parameters(SmallCNN(10, 1, width=8))
    tuned = torch.load(run / "members/3/checkpoints/best.pt", weights_only=True)
    assert "pruning" in tuned and tuned["config"]["model"]["weights"] == str(pruned)
    assert tuned["config"]["model"]["width"] == 8 and tuned["config"]["trainer"]["seed"] == 3


def test_int8_members_are_fused_and_keep_their_own_figures(tmp_path):
    runs = [tmp_path / f"int8-{seed}" for seed in (0, 1)]
    alone = [
        run_in_process(run, *MEMBER, f"trainer.seed={i}", "prune=quantize", "prune.mode=dynamic")
        for i, run in enumerate(runs)
    ]
    assert all(is_quantized(open_trained(run, "test").module) for run in runs)
    fuse = ["ensemble=average", f"ensemble.checkpoints=[{runs[0]},{runs[1]}]"]
    summary = run_in_process(tmp_path / "ensemble", *EVAL, *fuse)
    report = json.loads((tmp_path / "ensemble/ensemble.json").read_text())
    assert [m["test_acc"] for m in report["members"]] == [s["test_acc"] for s in alone]  # the same int8 models
    assert summary["test_acc"] > 0.5  # chance is 0.1


def test_mismatched_class_sets_are_one_clear_line(tmp_path):
    other = tmp_path / "three-classes"
    run_in_process(
        other, *SMOKE, "model=cnn", "model.width=4", "data=synthetic", "data.num_classes=3", "data.num_samples=120"
    )
    with pytest.raises(UserError) as info:
        run_in_process(tmp_path / "fused", *EVAL, "ensemble=average", f"ensemble.checkpoints=[{other}]")
    message = str(info.value)
    assert message.startswith("ensemble.checkpoints: ") and "ensemble members must share one class set" in message
    assert "(3 classes)" in message and "(10 classes)" in message and "\n" not in message
    assert not (tmp_path / "fused" / "members").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ensemble.members=3"], "ensemble.members is set but ensemble=none; pick a rule"),
        (["ensemble=average"], "ensemble=average has no members"),
        (
            ["ensemble=average", "ensemble.weights=[1,2]", "ensemble.members=2"],
            "ensemble.weights is used by ensemble=weighted",
        ),
        (
            ["ensemble=weighted", "ensemble.weights=[1]", "ensemble.members=2"],
            "ensemble.weights has 1 entries for 2 members",
        ),
        (["ensemble=vote", "ensemble.members=2", "ensemble.top_k=2"], "ensemble.top_k picks jobs of a sweep"),
        (
            ["ensemble=vote", "ensemble.members=2", "trainer.epochs=0"],
            "ensemble.members trains its members in this run",
        ),
        (
            ["ensemble=vote", "ensemble.members=2", "trainer.resume=auto"],
            "trainer.resume=auto: an ensemble run resumes from its run directory",
        ),
        (["ensemble=vote", "ensemble.members=2", "cv.folds=2"], "cv.folds does not apply to an ensemble run"),
        (["ensemble=vote", "ensemble.sweep=/nonexistent"], "ensemble.sweep='/nonexistent' is not a directory"),
        (
            ["ensemble=vote", "ensemble.checkpoints=[/nonexistent/best.pt]"],
            "ensemble.checkpoints: '/nonexistent/best.pt' does not exist",
        ),
        (["ensemble=vote", "ensemble.checkpoints=/nonexistent/best.pt"], "'/nonexistent/best.pt' does not exist"),
        (["ensemble=vote", "ensemble.checkpoints=[[a]]"], "ensemble.checkpoints=[['a']] is invalid"),
        (["ensemble=vote", "ensemble.members=['model=resnet1800']"], "ensemble.members[0] (model=resnet1800)"),
        (["ensemble=vote", "ensemble.members=['data.image_size=8']"], "changes data; members share this run's data"),
        (
            ["ensemble=vote", "model.weights=/nonexistent"],
            "model.weights='/nonexistent' is not an ensemble run directory",
        ),
    ],
)
def test_ensemble_config_mistakes_are_user_errors(tmp_path, overrides, message):
    with pytest.raises(UserError) as info:
        run_in_process(tmp_path, "model=cnn", "debug=smoke", *overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "members").exists()  # nothing trained before the mistake was found


@pytest.mark.slow  # the real command: five processes (45-70 s on 2 busy cores)
def test_a_sweeps_best_jobs_fused_without_training(tmp_path):
    sweep = shelltrain_forked(
        "-m",
        "model=cnn",
        "model.width=4",
        "trainer.seed=0,1,2,3",
        "debug=smoke",
        "trainer.device=cpu",
        "trainer.threads=1",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr
    jobs = {
        str(tmp_path / "sweep" / job): json.loads((tmp_path / "sweep" / job / "summary.json").read_text())[
            "best_val_acc"
        ]
        for job in "0123"
    }
    expected = sorted(jobs, key=jobs.__getitem__, reverse=True)[:3]  # stable: ties keep job order

    result = shelltrain_forked(
        "ensemble=weighted",
        "ensemble.sweep=sweep",
        "ensemble.top_k=3",
        "trainer.epochs=0",
        "trainer.device=cpu",
        "trainer.threads=1",
        "hydra.run.dir=fused",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "fused/ensemble.json").read_text())
    assert [m["origin"]["source"] for m in report["members"]] == expected
    assert all(m["origin"]["kind"] == "sweep" and m["epochs_trained"] == 0 for m in report["members"])
    assert report["weights"] == pytest.approx(accuracy_weights([m["val_acc"] for m in report["members"]]))
    assert "ensemble (weighted) vs its members" in result.stdout
    summary = json.loads((tmp_path / "fused/summary.json").read_text())
    assert summary["test_acc"] == report["test_acc"] and summary["epochs_completed"] == 0
    for i in range(3):  # self-contained: each member's weights copied, without optimizer state
        ckpt = torch.load(tmp_path / f"fused/members/{i}/checkpoints/best.pt", weights_only=True)
        assert "optimizer" not in ckpt and ckpt["classes"] == [str(c) for c in range(10)]


@pytest.mark.parametrize("rule", ["average", "weighted", "vote"])
def test_fused_model_predicts_what_the_rule_fuses(rule):
    torch.manual_seed(0)
    members = [SmallCNN(num_classes=4, in_channels=1, width=4).eval() for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        probs = torch.stack([m(x).softmax(1) for m in members])
        fused = FusedModel(members, rule, weights)(x)
    expected_probs, expected = fuse(rule, probs, weights)
    assert torch.equal(fused.argmax(1), expected)
    if rule != "vote":
        assert torch.allclose(fused.softmax(1), expected_probs.float(), atol=1e-6)


def test_predict_and_export_take_an_ensemble_run_directory(tmp_path):
    from fixtures_data import make_imagefolder

    run = tmp_path / "ensemble"
    run_in_process(run, *SMOKE, "model=cnn", "model.width=8", "ensemble=vote", "ensemble.members=2")
    images = make_imagefolder(tmp_path / "images", classes=("a", "b"), per_class=3, size=(16, 16), mode="L")
    predicted = run_in_process(tmp_path / "predict", "task=predict", f"model.weights={run}", f"predict.input={images}")
    assert predicted["images"] == 6 and predicted["weights"] == str(run / "ensemble.json")
    fused = open_trained(run).module
    assert isinstance(fused, FusedModel) and fused.rule == "vote" and len(fused.members) == 2
    exported = run_in_process(tmp_path / "export", "task=export", f"model.weights={run}", "export.format=torchscript")
    assert exported["max_abs_diff"] <= 1e-4 and (tmp_path / "export/model.torchscript.pt").is_file()
