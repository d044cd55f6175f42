"""Transfer learning: pretrained weights from every source, head surgery, preprocessing, freezing policies,
discriminative learning rates, and the class-subset / labelled-budget data options."""

from __future__ import annotations

import hashlib
import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import compose_config, run_in_process

from shelltrain.data import build_data
from shelltrain.engine import Callback, fit
from shelltrain.errors import UserError
from shelltrain.finetune import FinetunePolicy, backbone_units
from shelltrain.models import build_model
from shelltrain.optim import build_optimizer, build_scheduler
from shelltrain.schema import defaults
from shelltrain.transfer import _cached_file_check, load_weights, open_weights

CNN = ["model=cnn", "model.width=8", "scheduler=none"]


def plant_torchvision_weights(torch_home: Path, monkeypatch, name: str) -> dict[str, torch.Tensor]:
    """Write a (seeded random) state dict where torchvision's cache looks for `name`'s DEFAULT weights, point
    TORCH_HOME there, and make any download attempt fail as it does offline."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    torch.manual_seed(123)
    state = torchvision.models.get_model(name, num_classes=len(weights.meta["categories"])).state_dict()
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    _offline(monkeypatch)
    return state


def _offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def model_and_source(*overrides: str, num_classes: int = 10, in_channels: int = 3):
    cfg = compose_config(*overrides).model
    return cfg, build_model(cfg, num_classes, in_channels), open_weights(cfg)


def cnn_state(num_classes: int = 10, in_channels: int = 1, seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = compose_config(*CNN).model
    return build_model(cfg, num_classes, in_channels).state_dict()


# --- torchvision weights (acceptance 1) ----------------------------------------------------------------------


def test_default_resolves_through_torch_home_and_the_head_is_replaced(tmp_path, monkeypatch):
    planted = plant_torchvision_weights(tmp_path / "torch", monkeypatch, "resnet18")
    cfg, model, source = model_and_source("model=resnet18", "model.weights=DEFAULT")
    assert source.kind == "torchvision" and source.preprocessing == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "image_size": 224,
    }
    model, report = load_weights(model, source, classes=[str(i) for i in range(10)])
    state = model.state_dict()
    for key, value in planted.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(state[key], value), key
    assert state["fc.weight"].shape == (10, 512) and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert report["head"] == {
        "module": "fc",
        "replaced": True,
        "reason": "another shape",
        "from_classes": 1000,
        "to_classes": 10,
        "new": "Linear(512 -> 10)",
    }
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert "ResNet18_Weights.IMAGENET1K_V1" in report["origin"] and "resnet18-f37072fd.pth" in report["origin"]


def test_a_file_in_the_torchvision_cache_is_checked_against_the_hash_its_name_carries(tmp_path, monkeypatch):
    """torch.hub checks the SHA256 prefix of a file name only when it downloads; a file planted in the cache (here a
    random state dict) is said to be unverified on the weights line, and a file whose hash matches is verified."""
    plant_torchvision_weights(tmp_path / "torch", monkeypatch, "resnet18")
    _, model, source = model_and_source("model=resnet18", "model.weights=IMAGENET1K_V1")
    _, report = load_weights(model, source, classes=[str(i) for i in range(10)])
    assert "UNVERIFIED" in report["origin"] and "not the f37072fd torchvision published" in report["origin"]
    genuine = tmp_path / "weights.bin"
    genuine.write_bytes(b"published weights")
    named = tmp_path / f"net-{hashlib.sha256(genuine.read_bytes()).hexdigest()[:8]}.pth"
    genuine.rename(named)
    assert _cached_file_check(named).endswith("verified") and "UNVERIFIED" not in _cached_file_check(named)


def test_grey_input_sums_the_first_convolution_over_rgb(tmp_path, monkeypatch):
    planted = plant_torchvision_weights(tmp_path / "torch", monkeypatch, "resnet18")
    _, model, source = model_and_source("model=resnet18", "model.weights=IMAGENET1K_V1", in_channels=1)
    model, report = load_weights(model, source)
    assert torch.equal(model.conv1.weight, planted["conv1.weight"].sum(1, keepdim=True))
    assert report["adapted"] == ["conv1.weight: summed over 1 input channel(s) from 3"]
    rgb = torchvision.models.resnet18(num_classes=10).eval()
    rgb.load_state_dict({**model.state_dict(), "conv1.weight": planted["conv1.weight"]})
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # a grey image through the summed stem = the same image repeated as RGB
        assert torch.allclose(model.eval()(grey), rgb(grey.expand(-1, 3, -1, -1)), atol=1e-4)


def test_pretrained_linear_probe_end_to_end_follows_the_weights(tmp_path, monkeypatch, capsys):
    """model.weights=DEFAULT in a real run: normalization and input size from the weights' transforms, the head
    replaced for 10 classes, and under linear_probe every backbone tensor (BatchNorm statistics too) unchanged."""
    planted = plant_torchvision_weights(tmp_path / "torch", monkeypatch, "mobilenet_v3_small")
    summary = run_in_process(
        tmp_path / "run",
        "model=mobilenet_v3_small",
        "model.weights=DEFAULT",
        "finetune=linear_probe",
        "data.channels=3",
        "data.mean=null",
        "data.std=null",
        "data.image_size=null",
        "data.batch_size=4",
        "debug=smoke",
        "scheduler=none",
    )
    transfer = summary["transfer"]
    assert transfer["preprocessing"] == {
        "mean": pytest.approx([0.485, 0.456, 0.406]),
        "std": pytest.approx([0.229, 0.224, 0.225]),
        "image_size": 224,
        "from": "weights",
    }
    assert transfer["head"]["replaced"] and transfer["head"]["to_classes"] == 10
    assert transfer["finetune"]["policy"] == "linear_probe"
    assert transfer["trainable_params"] == 1024 * 10 + 10
    best = torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)
    assert best["preprocessing"]["image_size"] == 224
    head_changed = False
    for key, value in planted.items():
        if key.startswith("classifier.3."):
            head_changed |= best["model"][key].shape[0] == 10
        else:
            assert torch.equal(best["model"][key], value), key
    assert head_changed
    log = capsys.readouterr().out
    assert "head classifier.3 replaced (another shape): 1000 -> 10 classes" in log
    assert "preprocessing follows the weights" in log


@pytest.mark.slow
def test_data_config_values_win_and_the_log_says_how_to_follow_the_weights(tmp_path, monkeypatch, capsys):
    plant_torchvision_weights(tmp_path / "torch", monkeypatch, "mobilenet_v3_small")
    summary = run_in_process(
        tmp_path / "run",
        "model=mobilenet_v3_small",
        "model.weights=DEFAULT",
        "debug=smoke",
        "scheduler=none",
        "data.batch_size=4",
    )
    assert summary["transfer"]["preprocessing"]["from"] == "data config"
    assert summary["transfer"]["preprocessing"]["mean"] == pytest.approx([0.3055])  # the digits preset's
    log = capsys.readouterr().out
    assert "to follow the weights set data.mean=null data.std=null data.image_size=null (=224)" in log


def test_grey_data_gets_the_weights_statistics_averaged(tmp_path, monkeypatch):
    plant_torchvision_weights(tmp_path / "torch", monkeypatch, "mobilenet_v3_small")
    summary = run_in_process(
        tmp_path / "run",
        "model=mobilenet_v3_small",
        "model.weights=DEFAULT",
        "debug=smoke",
        "scheduler=none",
        "data.mean=null",
        "data.std=null",
        "data.batch_size=4",
    )
    assert summary["transfer"]["preprocessing"]["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert summary["transfer"]["adapted"] == ["features.0.0.weight: summed over 1 input channel(s) from 3"]


def test_offline_without_the_file_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    _offline(monkeypatch)
    _, model, source = model_and_source("model=resnet18", "model.weights=DEFAULT")
    expected = str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with pytest.raises(UserError, match="without network, put the file at " + expected.replace(".", r"\.")):
        load_weights(model, source)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=resnet18", "model.weights=IMAGENET1K_V7"],
            "resnet18 has no such weights; choose one of IMAGENET1K_V1",
        ),
        (["model=resnet18", "model.weights=ResNet50_Weights.DEFAULT"], "not weights of resnet18 (its weights are"),
        (["model=cnn", "model.weights=DEFAULT"], "is not a torchvision model; give a checkpoint path"),
        (["model=cnn", "model.weights=/nonexistent/run"], "'/nonexistent/run' does not exist"),
    ],
)
def test_bad_weights_are_one_clear_line(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        open_weights(compose_config(*overrides).model)


# --- checkpoint files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["plain", "module_prefix", "lightning", "safetensors", "shelltrain_pt"])
def test_every_file_form_loads(tmp_path, form):
    state = cnn_state()
    path = tmp_path / "weights.pt"
    if form == "plain":
        torch.save(state, path)
    elif form == "module_prefix":  # DataParallel / DDP
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif form == "lightning":
        path = tmp_path / "last.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    elif form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    else:
        torch.save({"model": state, "classes": [str(i) for i in range(10)], "epoch": 1}, path)
    _, model, source = model_and_source(*CNN, f"model.weights={path}", in_channels=1)
    model, report = load_weights(model, source, classes=[str(i) for i in range(10)])
    assert report["loaded"] == report["total"] == len(state) and not report["head"]["replaced"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert report["stripped_prefix"] == {"module_prefix": "module.", "lightning": "model."}.get(form)


@pytest.mark.slow
def test_partial_loads_are_listed_and_strict_refuses_them(tmp_path, capsys):
    state = cnn_state()
    state.pop("features.1.running_var")
    state["extra.weight"] = torch.zeros(3)
    state["features.4.weight"] = torch.zeros(16, 8, 5, 5)  # another kernel size
    torch.save(state, tmp_path / "partial.pt")
    partial = f"model.weights={tmp_path / 'partial.pt'}"
    summary = run_in_process(tmp_path / "run", *CNN, partial, "model.strict=false", "debug=smoke")
    transfer = summary["transfer"]
    assert transfer["missing"] == ["features.1.running_var"]
    assert transfer["unexpected"] == ["extra.weight"]
    assert transfer["mismatched"] == ["features.4.weight: (16, 8, 5, 5) in the weights, (16, 8, 3, 3) in the model"]
    log = capsys.readouterr().out
    assert "missing keys: features.1.running_var" in log and "unexpected keys: extra.weight" in log
    weights = f"model.weights={tmp_path / 'partial.pt'}"
    cfg, model, source = model_and_source(*CNN, weights, "model.strict=true", in_channels=1)
    with pytest.raises(UserError, match="model.strict=true: .* 1 missing, 1 unexpected, 1 mismatched"):
        load_weights(model, source, strict=cfg.strict)


def test_strict_accepts_a_replaced_head(tmp_path):
    torch.save(cnn_state(num_classes=4), tmp_path / "four.pt")
    weights = f"model.weights={tmp_path / 'four.pt'}"
    cfg, model, source = model_and_source(*CNN, weights, "model.strict=true", in_channels=1)
    _, report = load_weights(model, source, strict=cfg.strict)
    assert report["head"]["replaced"] and report["head"]["from_classes"] == 4


def test_nothing_that_fits_is_an_error(tmp_path):
    torch.save(cnn_state(), tmp_path / "cnn.pt")
    _, model, source = model_and_source("model=resnet18", f"model.weights={tmp_path / 'cnn.pt'}")
    with pytest.raises(UserError, match="no tensor of .*cnn.pt fits this model"):
        load_weights(model, source)


def test_head_under_another_name_is_found(tmp_path):
    torch.manual_seed(0)
    source_model = build_model(compose_config("model=resnet18").model, 10, 3)
    torch.save(source_model.state_dict(), tmp_path / "r18.pt")
    _, model, source = model_and_source("model=resnet18", "model.dropout=0.2", f"model.weights={tmp_path / 'r18.pt'}")
    model, report = load_weights(model, source)
    assert report["head_renamed_from"] == "fc" and report["head"]["module"] == "fc.1" and not report["head"]["replaced"]
    assert torch.equal(model.fc[1].weight, source_model.fc.weight) and report["unexpected"] == []


def test_a_pruned_checkpoint_goes_through_the_pruning_rebuild(tmp_path, monkeypatch):
    import shelltrain.prune

    calls = []
    real = shelltrain.prune.rebuild
    monkeypatch.setattr(shelltrain.prune, "rebuild", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    state = cnn_state()
    torch.save({"model": state, "pruning": {"ops": []}}, tmp_path / "pruned.pt")
    _, model, source = model_and_source(*CNN, f"model.weights={tmp_path / 'pruned.pt'}", in_channels=1)
    model, _ = load_weights(model, source)
    assert calls == [1]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_unsafe_or_corrupt_files_are_refused(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        open_weights(compose_config(*CNN, f"model.weights={tmp_path / 'bad.pt'}").model)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(UserError, match="not a readable .safetensors file"):
        open_weights(compose_config(*CNN, f"model.weights={tmp_path / 'bad.safetensors'}").model)


def test_user_target_models_do_not_receive_shelltrain_keys(tmp_path):
    state = {"net.1.weight": torch.ones(16, 64), "net.1.bias": torch.zeros(16)}
    torch.save(state, tmp_path / "tiny.pt")
    summary = run_in_process(
        tmp_path / "run",
        "~model",
        "+model._target_=test_models.TinyNet",
        f"+model.weights={tmp_path / 'tiny.pt'}",
        "debug=smoke",
        "scheduler=none",
        "data.image_size=8",
        "finetune=linear_probe",
    )
    assert summary["transfer"]["loaded"] == 2 and summary["transfer"]["missing"] == ["net.3.weight", "net.3.bias"]
    best = torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)["model"]
    assert torch.equal(best["net.1.weight"], state["net.1.weight"])  # frozen by the linear probe


# --- from a shelltrain run: class subsets, budgets, and the policies (acceptance 2) ---------------------------


@pytest.fixture(scope="module")
def digits_0_4(tmp_path_factory) -> Path:
    """A short shelltrain run on digits 0-4: the pretrained source for the runs below."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    run_in_process(run_dir, *CNN, "data.classes=[0,1,2,3,4]", "trainer.epochs=2", "optimizer=adam", "optimizer.lr=0.01")
    return run_dir


def _budget(*overrides: str, seed: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = compose_config("data.classes=[7,3]", "data.samples_per_class=5", *overrides)
    data = build_data(cfg.data, cfg.augmentation, seed=seed)
    train = data.train.dataset
    return data.classes, train.images.flatten(1).sum(1).sort().values, train.labels, data.test.dataset.labels


def test_class_subset_and_seeded_budget():
    classes, images, labels, test_labels = _budget()
    assert classes == ["7", "3"]  # relabelled in the order given: 7 -> 0, 3 -> 1
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5
    assert set(test_labels.tolist()) == {0, 1} and len(test_labels) > 50  # only the train split is budgeted
    assert torch.equal(_budget(seed=1)[1], images)  # the same budget for every trainer seed
    assert not torch.equal(_budget("data.split_seed=1")[1], images)  # another draw with another split seed


@pytest.mark.parametrize(
    "classes, message",
    [("[3,x]", "'x' is not a class of digits"), ("[3]", "fewer than 2 classes"), ("[3,3]", "names a class twice")],
)
def test_bad_class_lists(tmp_path, classes, message):
    with pytest.raises(UserError, match=message):
        run_in_process(tmp_path, *CNN, f"data.classes={classes}", "debug=smoke")


def test_linear_probe_from_a_run_keeps_the_backbone_bit_identical(tmp_path, digits_0_4):
    summary = run_in_process(
        tmp_path,
        *CNN,
        f"model.weights={digits_0_4}",
        "finetune=linear_probe",
        "data.classes=[5,6,7,8,9]",
        "data.samples_per_class=10",
        "trainer.epochs=3",
        "optimizer=adamw",
    )
    transfer = summary["transfer"]
    assert transfer["kind"] == "shelltrain" and transfer["origin"] == str(digits_0_4 / "checkpoints/best.pt")
    assert transfer["head"]["reason"] == "other classes"  # 5 classes both, but 5-9 are not 0-4
    source = torch.load(digits_0_4 / "checkpoints/best.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["model"]
    for key, value in source.items():
        if key.startswith("classifier."):
            assert not torch.equal(after[key], value)
        else:
            assert torch.equal(after[key], value), key  # weights, BN statistics, even under AdamW's weight decay
    units = transfer["finetune"]["units"]
    assert transfer["finetune"]["schedule"] == [
        {"epoch": 1, "frozen": units, "trainable": ["classifier.2"], "trainable_params": 32 * 5 + 5}
    ]


class _Snapshots(Callback):
    def __init__(self, model):
        self.model, self.states = model, [_clone(model)]

    def on_epoch_end(self, state, row, improved):
        self.states.append(_clone(self.model))


def _clone(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_with_policy(*finetune: str, epochs: int, lr_mult: bool = False):
    cfg = compose_config(*CNN, "data.limit_samples=64", *finetune)
    data = build_data(cfg.data, cfg.augmentation, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    policy = FinetunePolicy(model, cfg.finetune)
    optimizer = build_optimizer(cfg.optimizer, model, policy.param_groups())
    snapshots = _Snapshots(model)
    fit(
        model,
        data.train,
        data.val,
        optimizer,
        None,
        defaults("trainer", epochs=epochs, device=torch.device("cpu")),
        callbacks=[policy, snapshots],
    )
    return policy, snapshots.states


def _changed(before, after, prefix):
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_freeze_backbone_unfreezes_after_unfreeze_at_epochs():
    policy, states = _train_with_policy("finetune=freeze_backbone", "finetune.unfreeze_at=2", epochs=3)
    assert [e["epoch"] for e in policy.events] == [1, 3]
    for epoch in (1, 2):
        assert not _changed(states[epoch - 1], states[epoch], "features.")  # weights and BN statistics
        assert _changed(states[epoch - 1], states[epoch], "classifier.")
    assert _changed(states[2], states[3], "features.0.") and _changed(states[2], states[3], "features.1.running_mean")


def test_gradual_unfreezes_one_block_per_epoch_from_the_top():
    policy, states = _train_with_policy("finetune=gradual", "finetune.unfreeze_at=1", epochs=4)
    assert [e["trainable"] for e in policy.events] == [
        ["classifier.2"],
        ["features.8+features.9", "classifier.2"],
        ["features.4+features.5", "features.8+features.9", "classifier.2"],
        ["features.0+features.1", "features.4+features.5", "features.8+features.9", "classifier.2"],
    ]
    assert not _changed(states[1], states[2], "features.4.") and _changed(states[1], states[2], "features.8.")
    assert _changed(states[3], states[4], "features.0.")


def test_parameter_groups_carry_the_multiplied_learning_rates():
    cfg = compose_config(*CNN, "finetune.backbone_lr_mult=0.1", "optimizer.lr=0.2", "scheduler=onecycle")
    model = build_model(cfg.model, 10, 1)
    policy = FinetunePolicy(model, cfg.finetune)
    optimizer = build_optimizer(cfg.optimizer, model, policy.param_groups())
    groups = [(g["name"], g["lr"]) for g in optimizer.param_groups]
    assert groups == [("classifier.2", 0.2), ("backbone", pytest.approx(0.02))]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    schedule = build_scheduler(cfg.scheduler, optimizer, epochs=2, steps_per_epoch=5, monitor_mode="max")
    assert [g["max_lr"] for g in optimizer.param_groups] == [0.2, pytest.approx(0.02)]
    assert schedule is not None

    cfg = compose_config(
        *CNN,
        "finetune.backbone_lr_mult=0.5",
        "finetune.layer_decay=0.5",
        "optimizer.lr=0.2",
        "optimizer.no_decay_norm_bias=true",
    )
    model = build_model(cfg.model, 10, 1)
    optimizer = build_optimizer(cfg.optimizer, model, FinetunePolicy(model, cfg.finetune).param_groups())
    lrs = {(g["name"], g["weight_decay"]): g["lr"] for g in optimizer.param_groups}
    assert lrs == {
        ("classifier.2", 5e-4): 0.2,
        ("classifier.2", 0.0): 0.2,
        ("features.8+features.9", 5e-4): 0.1,
        ("features.8+features.9", 0.0): 0.1,
        ("features.4+features.5", 5e-4): 0.05,
        ("features.4+features.5", 0.0): 0.05,
        ("features.0+features.1", 5e-4): 0.025,
        ("features.0+features.1", 0.0): 0.025,
    }


def test_units_split_any_architecture_into_blocks():
    resnet = torchvision.models.resnet18()
    assert [u.name for u in backbone_units(resnet, "fc")] == [
        "conv1+bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4.0",
        "layer4.1",
    ]
    mobilenet = torchvision.models.mobilenet_v3_small()
    names = [u.name for u in backbone_units(mobilenet, "classifier.3")]
    assert names == [f"features.{i}" for i in range(13)] + ["classifier"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.policy=bogus", "finetune.policy='bogus' is invalid"),
        ("finetune.layer_decay=0", "finetune.layer_decay=0.0 is out of range"),
        ("finetune.unfreeze_every=0", "finetune.unfreeze_every=0 is out of range"),
        ("data.samples_per_class=0", "data.samples_per_class=0 is out of range"),
    ],
)
def test_bad_finetune_values(override, message):
    from shelltrain.schema import validate

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        validate(compose_config(override))


def test_image_size_null_needs_weights_that_give_one(tmp_path):
    with pytest.raises(UserError, match="data.image_size=null takes the input size from model.weights"):
        run_in_process(tmp_path, *CNN, "data.image_size=null", "debug=smoke")


@pytest.mark.slow
def test_pretraining_on_digits_0_4_helps_on_5_9(tmp_path):
    """Acceptance: fine-tuned beats scratch, and a linear probe on pretrained features beats one on random
    features, with the same small labelled budget (benchmarks/transfer.py reports the same experiment)."""
    import statistics
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from transfer import experiment

    results = experiment(tmp_path, budget=3, seeds=4, epochs=30, pretrain_epochs=8)
    arms = {name: statistics.mean(accs) for name, accs in results["arms"].items()}
    assert arms["finetune_pretrained"] > arms["finetune_scratch"]
    assert arms["probe_pretrained"] > arms["probe_random"]
