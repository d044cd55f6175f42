"""Pruning in process on a tiny CNN: masks reach the amount, channels are really removed, and the pruning
checkpoint entry rebuilds the exact architecture."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from shelltrain.errors import UserError
from shelltrain.prune import preflight, prune_model, rebuild
from shelltrain.prune.report import tradeoff_rows
from shelltrain.schema import defaults, packaged

QUICK = {"finetune_epochs": 0, "latency_batch": 2, "latency_repeats": 1, "schedule": "oneshot"}


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 8, 8, generator=generator), torch.arange(4) % 3) for _ in range(n)]


def prune(model: nn.Module, **cfg):
    data = type("Data", (), {"train": batches(), "val": batches(), "test": batches()})
    settings = defaults("trainer", epochs=0, device=torch.device("cpu"))
    options = OmegaConf.merge(packaged("prune"), {**QUICK, **cfg})
    return prune_model(options, model, data, settings, finetune=None, say=lambda m: None)


def test_magnitude_pruning_makes_every_layer_but_the_classifier_sparse_at_the_amount():
    result = prune(tiny_cnn(), name="magnitude", amount=0.6, **{"global": False})
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    for module in convs:
        zeros = (module.weight == 0).float().mean().item()
        assert 0.6 <= zeros < 0.6 + 1 / module.weight.numel() + 1e-9
        assert not hasattr(module, "weight_mask")  # made permanent: plain tensors
    assert torch.count_nonzero(result.model[-1].weight) == result.model[-1].weight.numel()  # the classifier: dense
    # the model's sparsity counts the dense classifier too: the convs' zeros over all conv/linear weights
    zeros = sum(int((m.weight == 0).sum()) for m in convs)
    total = sum(m.weight.numel() for m in result.model.modules() if isinstance(m, LAYER))
    assert result.report["after"]["sparsity"] == pytest.approx(zeros / total) and zeros / total < 0.6
    assert result.report["after"]["params"] == result.report["before"]["params"]  # zeros, not removed


def test_the_classifier_is_excluded_by_default_and_pruned_only_when_modules_names_it():
    default = prune(tiny_cnn(), name="magnitude", amount=0.6, **{"global": True})
    table = {row["name"]: (row["chosen"], row["changed"]) for row in default.report["layers"]}
    assert table["7"] == (False, False)  # the per-layer table shows it untouched
    assert zeros_by_layer(default.model)["7"] == 0.0
    named = prune(tiny_cnn(), name="magnitude", amount=0.6, modules=["0", "3", "7"], **{"global": False})
    assert zeros_by_layer(named.model)["7"] >= 0.6
    assert {row["name"]: row["chosen"] for row in named.report["layers"]}["7"] is True


def test_structured_pruning_removes_channels_and_the_model_still_runs():
    result = prune(tiny_cnn(), name="structured", ratio=0.5, importance="l1", **{"global": False})
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4]
    assert result.model[-1].in_features == 4 and result.model[-1].out_features == 3  # the head keeps its classes
    assert result.model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert result.report["after"]["params"] < result.report["before"]["params"]
    labels = [row["label"] for row in tradeoff_rows(result.report)]
    assert labels == ["before", "oneshot", "final"]


def test_rebuild_from_the_pruning_checkpoint_gives_identical_outputs():
    result = prune(tiny_cnn(), name="structured", ratio=0.5, importance="l1", **{"global": False})
    checkpoint = {"pruning": result.checkpoint, "model": result.model.state_dict()}
    example = torch.zeros(1, 1, 8, 8)
    fresh = rebuild(tiny_cnn(), checkpoint, example_inputs=example)
    fresh.load_state_dict(checkpoint["model"])  # strict: the architecture fits exactly
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), result.model.eval()(x))


def zeros_by_layer(model: nn.Module) -> dict[str, float]:
    return {n: (m.weight == 0).float().mean().item() for n, m in model.named_modules() if isinstance(m, LAYER)}


LAYER = (nn.Conv2d, nn.Linear)


def test_modules_patterns_choose_the_only_layers_that_get_sparse():
    result = prune(tiny_cnn(), name="magnitude", amount=0.6, modules=["0*"], **{"global": False})
    zeros = zeros_by_layer(result.model)
    assert zeros["0"] >= 0.6
    assert zeros["3"] == 0.0 and zeros["7"] == 0.0
    table = {row["name"]: (row["chosen"], row["changed"]) for row in result.report["layers"]}
    assert table == {"0": (True, True), "3": (False, False), "7": (False, False)}


def test_exclude_leaves_a_layer_dense():
    result = prune(tiny_cnn(), name="magnitude", amount=0.6, exclude=["7"], **{"global": True})
    zeros = zeros_by_layer(result.model)
    assert zeros["7"] == 0.0
    assert zeros["0"] > 0 and zeros["3"] > 0


def test_structured_honours_exclude():
    result = prune(tiny_cnn(), name="structured", ratio=0.5, importance="l1", exclude=["3"], **{"global": False})
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert result.model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_a_pattern_that_matches_no_layer_is_one_clear_line():
    with pytest.raises(UserError, match=r"prune.modules: 'layer9\*' matches no conv/linear layer"):
        prune(tiny_cnn(), name="magnitude", modules=["layer9*"])


def test_dynamic_quantization_keeps_to_the_chosen_layers_and_rebuilds_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    result = prune(model, name="quantize", mode="dynamic", bits=8, backend="x86", exclude=["3"])
    assert type(result.model[1]).__name__ == "Linear" and "quantized" in type(result.model[1]).__module__
    assert type(result.model[3]) is nn.Linear  # excluded: float
    checkpoint = {"pruning": result.checkpoint, "model": result.model.state_dict()}
    fresh = rebuild(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)), checkpoint)
    fresh.load_state_dict(checkpoint["model"])
    assert type(fresh[3]) is nn.Linear


def test_a_pattern_that_matches_nothing_fails_in_preflight_before_training():
    with pytest.raises(UserError, match="prune.exclude: 'fc' matches no conv/linear layer"):
        preflight(
            OmegaConf.merge(packaged("prune"), {"name": "magnitude", "exclude": ["fc"]}),
            tiny_cnn(),
            torch.zeros(1, 1, 8, 8),
        )
