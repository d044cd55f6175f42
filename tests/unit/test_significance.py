"""The paired statistics of the baseline gate and shelltrain-compare: McNemar's exact test against scipy's binomial
test, the paired-bootstrap interval, per-class recall changes, and what the gates make of them."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.stats import binomtest

from shelltrain.errors import UserError
from shelltrain.gates import active, check, check_baseline_settings, metric_gates
from shelltrain.significance import compare_predictions, mcnemar_exact, paired_bootstrap, relative_ids, same_split


@pytest.mark.parametrize(("b", "c"), [(0, 10), (3, 12), (40, 55), (7, 7), (1, 0), (500, 580)])
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs(b: int, c: int) -> None:
    expected = binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(c, b) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_without_discordant_pairs_finds_nothing() -> None:
    assert mcnemar_exact(0, 0) == 1.0


def test_bootstrap_interval_holds_the_difference_and_narrows_with_more_images() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (200, 5000):
        base = rng.random(n) < 0.8
        new = np.where(rng.random(n) < 0.1, ~base, base)
        diff, low, high = paired_bootstrap(new, base, 0.95)
        assert diff == pytest.approx(new.mean() - base.mean())
        assert low < diff < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # about 1/sqrt(25)


def test_bootstrap_of_identical_answers_is_exactly_zero() -> None:
    same = np.array([1, 0, 1, 1, 0])
    assert paired_bootstrap(same, same, 0.95) == (0.0, 0.0, 0.0)


def test_compare_predictions_reports_class_recall_changes() -> None:
    true = ["a", "a", "b", "b"]
    base = {"true": true, "predicted": ["a", "a", "b", "b"], "correct": [1, 1, 1, 1]}
    new = {"true": true, "predicted": ["a", "a", "a", "b"], "correct": [1, 1, 0, 1]}
    section = compare_predictions(new, base, alpha=0.05)
    assert section["acc_diff"] == pytest.approx(-0.25)
    assert (section["new_only_right"], section["baseline_only_right"]) == (0, 1)
    assert section["class_recall"]["b"] == {"baseline": 1.0, "new": 0.5, "change": -0.5}
    assert section["worst_class"] == "b" and section["max_class_recall_drop"] == 0.5
    assert not section["significant"]  # one discordant pair: p = 1


def test_relative_ids_survive_moving_the_data() -> None:
    a = relative_ids(["/data/x/test/cat/1.png", "/data/x/test/dog/2.png"])
    b = relative_ids(["/mnt/copy/test/cat/1.png", "/mnt/copy/test/dog/2.png"])
    assert a == b == ["cat/1.png", "dog/2.png"]


def test_same_split_needs_every_identity_key() -> None:
    entry = {"kind": "tensor", "count": 3, "membership": "m", "content": "c"}
    assert same_split(entry, dict(entry))
    assert not same_split(entry, {**entry, "content": "other"})
    assert not same_split(entry, None)


GATE = {"baseline": "somewhere", "baseline_alpha": 0.05, "baseline_max_drop": 0.01, "class_recall_drop_max": None}


def _summary(acc_diff: float, significant: bool, recall_drop: float = 0.0) -> dict:
    p = 0.001 if significant else 0.4
    section = {"acc_diff": acc_diff, "significant": significant, "mcnemar_p": p, "level": 0.95}
    return {"test_acc": 0.9, "baseline": {**section, "max_class_recall_drop": recall_drop}}


@pytest.mark.parametrize(
    ("acc_diff", "significant", "passed"),
    [(-0.05, True, False), (-0.05, False, True), (-0.005, True, True), (0.03, True, True)],
)
def test_baseline_drop_gate_fails_only_a_significant_drop_beyond_the_limit(
    acc_diff: float, significant: bool, passed: bool
) -> None:
    verdict = check(GATE, _summary(acc_diff, significant))
    assert verdict["passed"] is passed
    assert verdict["checked"]["baseline_max_drop"]["value"] == pytest.approx(-acc_diff)


def test_class_recall_gate_reads_the_baseline_section() -> None:
    gate = {**GATE, "baseline_max_drop": None, "class_recall_drop_max": 0.1}
    assert check(gate, _summary(0.0, False, recall_drop=0.05))["passed"]
    verdict = check(gate, _summary(0.0, False, recall_drop=0.2))
    assert not verdict["passed"] and "class_recall_drop=0.2" in verdict["failures"][0]


def test_baseline_settings_are_not_metric_gates() -> None:
    assert metric_gates({**GATE, "test_acc_min": 0.5}) == {"class_recall_drop_max": None, "test_acc_min": 0.5}
    assert not active({**GATE, "baseline": None, "baseline_max_drop": None})
    assert active({**GATE, "baseline_max_drop": None})


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"baseline_alpha": 1.5}, "gate.baseline_alpha=1.5"),
        ({"baseline_max_drop": -0.1}, "gate.baseline_max_drop=-0.1"),
        ({"baseline": None}, "set gate.baseline=RUN_DIR"),
        ({"baseline": 3}, "gate.baseline=3"),
    ],
)
def test_bad_baseline_settings_are_one_line(change: dict, named: str) -> None:
    with pytest.raises(UserError, match=re.escape(named)) as info:
        check_baseline_settings({**GATE, **change})
    assert "\n" not in str(info.value)
