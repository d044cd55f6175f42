"""Confusion matrix and per-class scores on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from shelltrain.metrics import confusion_matrix, per_class_metrics, top_k_accuracy

# predictions 0, 1, 1, 2, 0 for targets 0, 1, 0, 2, 2
LOGITS = torch.tensor(
    [[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0], [2.0, 0.0, 1.0]],
)
TARGETS = torch.tensor([0, 1, 0, 2, 2])


def test_confusion_matrix_rows_are_true_columns_predicted():
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(confusion_matrix(LOGITS, TARGETS, 3), expected)


def test_per_class_precision_recall_f1_support():
    scores = per_class_metrics(confusion_matrix(LOGITS, TARGETS, 3), ["a", "b", "c"])
    assert scores["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert scores["b"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert scores["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})


def test_a_class_never_predicted_scores_zero_not_nan():
    scores = per_class_metrics(torch.tensor([[2, 0], [1, 0]]), ["x", "y"])
    assert scores["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_top_k_accuracy():
    assert top_k_accuracy(LOGITS, TARGETS, 1) == pytest.approx(3 / 5)
    assert top_k_accuracy(LOGITS, TARGETS, 2) == pytest.approx(5 / 5)
