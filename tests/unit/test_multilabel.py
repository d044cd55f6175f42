"""Multi-label pieces (trainer.loss=bce): the figures against scikit-learn, threshold tuning, the stratum used for
splits, the manifest's two multi-label forms, and the one-line refusals of options that assume one class."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from sklearn.metrics import average_precision_score, f1_score

from shelltrain.data.manifest import manifest_sources
from shelltrain.errors import UserError
from shelltrain.fusion import FusedModel
from shelltrain.multilabel import balanced_pos_weight, bce, scores, stratum, tune_thresholds
from shelltrain.schema import validate


def _random_set(seed: int = 0, n: int = 60, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    truth = (torch.rand(n, classes, generator=generator) < 0.4).float()
    logits = truth * 1.5 + torch.randn(n, classes, generator=generator)  # informative but noisy
    return logits, truth


def test_map_and_f1_match_scikit_learn():
    logits, truth = _random_set()
    measured = scores(logits, truth)
    probabilities = logits.sigmoid().numpy()
    expected = average_precision_score(truth.numpy(), probabilities, average=None)
    assert measured["per_class"]["ap"] == pytest.approx(expected.tolist(), abs=1e-9)
    assert measured["map"] == pytest.approx(expected.mean(), abs=1e-9)
    decided = (probabilities >= 0.5).astype(int)
    assert measured["f1_micro"] == pytest.approx(f1_score(truth.numpy(), decided, average="micro"), abs=1e-9)
    assert measured["f1_macro"] == pytest.approx(f1_score(truth.numpy(), decided, average="macro"), abs=1e-9)


def test_tuned_thresholds_reach_the_best_f1_of_each_class():
    logits, truth = _random_set(1)
    tuned = torch.tensor(tune_thresholds(logits, truth))
    at_tuned = scores(logits, truth, tuned)["per_class"]["f1"]
    probabilities = logits.sigmoid()
    for k in range(truth.shape[1]):
        best = max(
            f1_score(truth[:, k].numpy(), (probabilities[:, k] >= t).numpy().astype(int))
            for t in probabilities[:, k].tolist()
        )
        assert at_tuned[k] == pytest.approx(best, abs=1e-9)


def test_smoothing_moves_targets_towards_one_half_and_class_indices_are_one_hot():
    logits = torch.zeros(2, 3)
    assert bce(logits, torch.tensor([0, 2])).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    big = torch.tensor([[9.0, -9.0, -9.0], [-9.0, -9.0, 9.0]])
    assert bce(big, hot, smoothing=0.2) > bce(big, hot)  # confident right answers cost more with smoothing


def test_the_stratum_is_each_images_rarest_label():
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.float32)
    assert stratum(labels).tolist() == [1, 0, 2, 3]  # class 0 is common, 1 and 2 rare; no label: its own stratum


def _images(folder, count=6):
    from PIL import Image

    (folder / "images").mkdir()
    for i in range(count):
        Image.new("RGB", (4, 4)).save(folder / "images" / f"{i}.png")


def test_a_manifest_reads_joined_labels_and_class_columns_as_the_same_rows(tmp_path):
    _images(tmp_path)
    joined = tmp_path / "joined.csv"
    joined.write_text("path,label\n" + "".join(f"images/{i}.png,{'cat|dog' if i % 2 else 'dog'}\n" for i in range(6)))
    columns = tmp_path / "columns.csv"
    columns.write_text("path,cat,dog\n" + "".join(f"images/{i}.png,{i % 2},1\n" for i in range(6)))
    data = compose_config("data=manifest", f"data.manifest={joined}", "trainer.loss=bce").data
    sources, classes, _ = manifest_sources(data, multi_label=True)
    flags = compose_config("data=manifest", f"data.manifest={columns}", "data.label_column=[cat,dog]").data
    sources_2, classes_2, _ = manifest_sources(flags)
    assert classes == classes_2 == ["cat", "dog"]
    assert sources["train"][1].tolist() == sources_2["train"][1].tolist() == [[i % 2, 1.0] for i in range(6)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,label\nimages/0.png,cat|\n", "labels.csv:2: empty label"),
        ("path,label\nimages/0.png,cat|cow\n", "labels.csv:2: label 'cow' is not in data.classes"),
    ],
)
def test_bad_multilabel_rows_are_named(tmp_path, text, message):
    _images(tmp_path, 1)
    (tmp_path / "labels.csv").write_text(text)
    data = compose_config("data=manifest", f"data.manifest={tmp_path / 'labels.csv'}", "data.classes=[cat,dog]").data
    with pytest.raises(UserError, match=message):
        manifest_sources(data, multi_label=True)


def test_a_class_column_that_is_not_zero_or_one_names_the_row(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "labels.csv").write_text("path,cat,dog\nimages/0.png,1,0\nimages/1.png,1,yes\n")
    data = compose_config("data=manifest", f"data.manifest={tmp_path / 'labels.csv'}", "data.label_column=[cat,dog]")
    with pytest.raises(UserError, match="labels.csv:3: class column dog holds 'yes', not 0 or 1"):
        manifest_sources(data.data)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ensemble=vote", "ensemble.members=2"], "ensemble=vote does not apply to multi-label"),
        (["trainer.calibrate=temperature"], "trainer.calibrate=temperature does not apply to multi-label"),
        (["data.balance=sampler"], "data.balance=sampler does not apply to multi-label"),
        (["augmentation.mixup_alpha=0.2"], "mixup/cutmix needs trainer.loss=cross_entropy"),
        (["distill=logits", "distill.teacher=/tmp"], "distill=logits does not apply to multi-label"),
        (["task=audit"], "task=audit does not apply to multi-label .*set trainer.loss=cross_entropy"),
    ],
)
def test_single_label_options_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(compose_config("model=cnn", "trainer.loss=bce", *overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.pos_weight=balanced"], r"trainer.pos_weight=balanced is multi-label; set trainer.loss=bce"),
        (["trainer.monitor=val_map"], r"trainer.monitor=val_map is multi-label; set trainer.loss=bce"),
        (["trainer.loss=mse", "trainer.label_smoothing=0.1"], "cross_entropy only, or bce"),
    ],
)
def test_multilabel_keys_need_bce(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(compose_config("model=cnn", *overrides))


def test_balanced_pos_weight_is_negatives_over_positives_per_class():
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float32)
    assert balanced_pos_weight(labels, 3).tolist() == pytest.approx([1 / 3, 1.0, 1.0])  # no positives: weight 1
    assert balanced_pos_weight(torch.tensor([0, 0, 0, 1]), 2).tolist() == pytest.approx([1 / 3, 3.0])


def test_a_fused_multilabel_model_outputs_the_logit_of_the_averaged_probabilities():
    torch.manual_seed(0)
    members = [torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)]
    x = torch.randn(7, 5)
    fused = FusedModel(members, "average", [1.0, 1.0], multi_label=True)
    expected = torch.stack([m(x).sigmoid() for m in members]).mean(0)
    assert torch.allclose(fused(x).sigmoid(), expected, atol=1e-6)
