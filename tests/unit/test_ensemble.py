"""The ensemble's combination rules on hand-made member probabilities (M members x N samples x C classes)."""

from __future__ import annotations

import pytest
import torch

from shelltrain.fusion import accuracy_weights, average, fuse, fused_metrics, vote, weighted

# Two samples, three classes, three members.
PROBS = torch.tensor(
    [
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]],
        [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
        [[0.5, 0.4, 0.1], [0.1, 0.2, 0.7]],
    ]
)


def test_average_is_the_mean_over_members():
    assert torch.allclose(average(PROBS), torch.tensor([[0.4, 0.5, 0.1], [0.2, 0.4, 0.4]]))


def test_weighted_normalizes_the_weights():
    fused = weighted(PROBS, [2.0, 0.0, 0.0])  # all weight on member 0
    assert torch.allclose(fused, PROBS[0])
    assert torch.allclose(weighted(PROBS, [1, 1, 1]), average(PROBS))


def test_vote_takes_the_majority_and_breaks_ties_by_summed_probability():
    # sample 0: votes 0, 1, 0 -> class 0 (though the mean favours class 1)
    # sample 1: votes 1, 2, 2 -> class 2
    assert vote(PROBS).tolist() == [0, 2]
    tie = torch.tensor([[[0.6, 0.4]], [[0.45, 0.55]]])  # one vote each; summed 1.05 vs 0.95
    assert vote(tie).tolist() == [0]
    probs, preds = fuse("vote", PROBS, [1 / 3] * 3)
    assert preds.tolist() == [0, 2] and torch.allclose(probs, average(PROBS))


def test_accuracy_weights_follow_the_temperature():
    assert accuracy_weights([0.5, 0.5]) == pytest.approx([0.5, 0.5])
    assert accuracy_weights([0.6, 0.3]) == pytest.approx([2 / 3, 1 / 3])
    sharp = accuracy_weights([0.6, 0.3], temperature=0.1)
    assert sharp[0] > 0.99 and sum(sharp) == pytest.approx(1.0)
    assert accuracy_weights([0.0, float("nan")]) == pytest.approx([0.5, 0.5])


def test_fused_metrics_are_accuracy_and_nll():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    metrics = fused_metrics(probs, probs.argmax(1), torch.tensor([0, 1]))
    assert metrics["acc"] == 1.0
    assert metrics["loss"] == pytest.approx(-(torch.tensor(0.5).log() + torch.tensor(0.75).log()).item() / 2)


def test_top_k_refuses_a_sweep_with_fewer_finished_jobs(tmp_path):
    """ensemble.top_k=2 over a sweep where one job finished must not silently fuse a single member."""
    from shelltrain.errors import UserError
    from shelltrain.rundir import write_json
    from shelltrain.trained import sweep_jobs

    write_json({"status": "completed", "best_val_acc": 0.9}, tmp_path / "0" / "summary.json")
    write_json({"status": "failed", "error": "boom"}, tmp_path / "1" / "summary.json")
    assert [job.name for job, _ in sweep_jobs(tmp_path, 1, "val_acc")] == ["0"]
    with pytest.raises(
        UserError, match=r"ensemble.top_k=2 but .* holds only 1 finished job\(s\); lower ensemble.top_k"
    ):
        sweep_jobs(tmp_path, 2, "val_acc")
