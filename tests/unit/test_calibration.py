"""ECE and NLL, in every summary's split metrics, checked on hand-made logits."""

from __future__ import annotations

import math

import torch

from shelltrain.metrics import expected_calibration_error, nll, split_metrics
from shelltrain.schema import defaults

# softmax probabilities (0.9, 0.1), (0.9, 0.1), (0.4, 0.6), (0.4, 0.6): logits are their logs
PROBABILITIES = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
TARGETS = torch.tensor([0, 1, 1, 1])


def test_ece_by_hand():
    # confidence 0.9: accuracy 1/2 -> |0.5 - 0.9| = 0.4; confidence 0.6: accuracy 1 -> 0.4; each bin half the data
    assert math.isclose(expected_calibration_error(PROBABILITIES.log(), TARGETS), 0.4, abs_tol=1e-6)
    confident_and_right = torch.tensor([[0.99, 0.01]]).log()
    assert math.isclose(expected_calibration_error(confident_and_right, torch.tensor([0])), 0.01, abs_tol=1e-6)


def test_ece_separates_bins():
    # one bin of confidence 0.55 with accuracy 1/2 (gap 0.05), one of 0.95 with accuracy 1 (gap 0.05)
    probabilities = torch.tensor([[0.55, 0.45], [0.55, 0.45], [0.95, 0.05], [0.95, 0.05]])
    targets = torch.tensor([0, 1, 0, 0])
    assert math.isclose(expected_calibration_error(probabilities.log(), targets), 0.05, abs_tol=1e-6)
    # binned apart as they are; in one bin the gap would be |0.75 - 0.75| = 0


def test_nll_and_the_summary_keys():
    expected = -(math.log(0.9) + math.log(0.1) + 2 * math.log(0.6)) / 4
    assert math.isclose(nll(PROBABILITIES.log(), TARGETS), expected, rel_tol=1e-6)
    figures = split_metrics(PROBABILITIES.log(), TARGETS, defaults("trainer", loss="mse"), "test")
    assert math.isclose(figures["test_nll"], expected, rel_tol=1e-6)  # the NLL, not the MSE loss
    assert math.isclose(figures["test_ece"], 0.4, abs_tol=1e-6)
    assert not math.isclose(figures["test_loss"], expected, rel_tol=1e-3)


def test_temperature_scaling_undoes_over_confidence():
    # labels drawn from softmax(z): z is calibrated, 10 z over-confident; the fitted T comes back near 10
    from shelltrain.calibration import fit_temperature

    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 1.5
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)
    confident = true_logits * 10
    temperature = fit_temperature(confident, labels)
    assert 8.0 < temperature < 12.0
    assert expected_calibration_error(confident / temperature, labels) < expected_calibration_error(confident, labels)
    assert torch.equal((confident / temperature).argmax(1), confident.argmax(1))


def test_stacked_ensemble_members_keep_their_own_temperatures():
    # ensemble.vmap stacks same-architecture members' state: each member's temperature must be part of it
    from torch.utils.data import TensorDataset

    from shelltrain.calibration import Tempered
    from shelltrain.data.loader import Loader
    from shelltrain.fusion import member_logits

    torch.manual_seed(0)
    members = [Tempered(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)), t) for t in (2.0, 5.0)]
    loader = Loader(TensorDataset(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    settings = defaults("trainer", device=torch.device("cpu"), channels_last=False)
    looped, _ = member_logits(members, loader, settings, None, stacked=False)
    stacked, _ = member_logits(members, loader, settings, None, stacked=True)
    assert torch.allclose(looped, stacked, atol=1e-6)
