"""The digits and the carved splits without importing scikit-learn at run time: the same images as load_digits and
the same draws as train_test_split, so runs made before keep their splits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from shelltrain.data.sources import digits_arrays
from shelltrain.data.splits import shuffle_split


def test_the_digits_are_scikit_learns():
    images, labels = digits_arrays()
    digits = load_digits()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)


@pytest.mark.parametrize("case", range(60))
def test_carving_draws_what_train_test_split_draws(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(20, 400))
    labels = rng.integers(0, int(rng.integers(2, 8)), n)
    labels[: 2 * labels.max() + 2] = np.repeat(np.arange(labels.max() + 1), 2)  # every class at least twice
    index = rng.permutation(n) + 1000
    count = int(rng.integers(labels.max() + 1, n - labels.max() - 1))
    seed = int(rng.integers(0, 2**31))
    stratify = labels if case % 3 else None
    want = train_test_split(index, test_size=count, random_state=seed, stratify=stratify)
    got = shuffle_split(index, count, seed, stratify)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
