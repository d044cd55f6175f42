"""Latency figures: the median of interleaved repeats with their spread, a warning when the spread is large, and
words that follow the measured speed-up (never "speed-up" for a model that became slower)."""

from __future__ import annotations

import time

from torch import nn

from shelltrain.prune import _time_side_by_side, layer, structured
from shelltrain.prune.measure import LatencySpec, latency_figures
from shelltrain.prune.report import speed_change


class Uneven(nn.Module):
    """A model whose forward takes 1 ms, then 6 ms, in turn: a busy machine, as latency sees it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.006 if self.calls % 2 else 0.001)
        return x


class Steady(nn.Module):
    def forward(self, x):
        time.sleep(0.002)
        return x


SPEC = LatencySpec(batch=1, threads=1, repeats=8, warmup=0)


def test_latency_is_a_median_with_its_spread():
    steady, uneven = latency_figures([Steady(), Uneven()], (1, 2, 2), SPEC)
    assert 2.0 <= steady.median_ms < 4.0 and steady.spread < 0.5
    assert 1.0 <= uneven.median_ms < 7.0 and uneven.spread > 0.5  # half the repeats at 1 ms, half at 6 ms


def test_a_large_spread_is_said_and_recorded():
    said: list[str] = []
    before, after = {}, {}
    _time_side_by_side([Steady(), Uneven()], (1, 2, 2), (before, after), SPEC, False, said.append)
    assert after["latency_spread"] > 0.5 and before["latency_ms"] > 0
    assert len(said) == 1 and "prune.latency_repeats" in said[0]
    quiet: list[str] = []
    _time_side_by_side([Steady(), Steady()], (1, 2, 2), ({}, {}), SPEC, False, quiet.append)
    assert quiet == []


def test_the_words_follow_the_measured_speed_up():
    steady = {"latency_spread": 0.02}
    assert speed_change(steady, steady, 0.12) == "8.33x slower"
    assert speed_change(steady, steady, 2.5) == "2.50x faster"
    assert speed_change(steady, {"latency_spread": 0.3}, 0.8).startswith("no measurable change")
    for note in (structured.NOTE, layer.NOTE):  # the notes claim no speed-up the figure could contradict
        assert "speed-up" not in note
