"""Confidence figures on cases with a known answer."""

import numpy as np
import pytest

from missrec.evaluation.stats import mean_std, paired_bootstrap


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)


def test_constant_difference_has_a_point_interval():
    ref = np.linspace(0, 1, 50)
    interval = paired_bootstrap(ref + 0.1, ref, resamples=500)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)
    assert interval.verdict == "ahead"
    assert paired_bootstrap(ref - 0.1, ref, resamples=500).verdict == "behind"


def test_interval_matches_the_normal_theory_width():
    rng = np.random.default_rng(1)
    n = 4000
    diff = rng.normal(0.05, 1.0, size=n)  # standard error 1/sqrt(n) = 0.0158
    interval = paired_bootstrap(diff, np.zeros(n), resamples=4000, seed=2)
    half = 1.96 / np.sqrt(n)
    assert interval.mean_diff == pytest.approx(diff.mean())
    assert interval.low == pytest.approx(diff.mean() - half, abs=0.003)
    assert interval.high == pytest.approx(diff.mean() + half, abs=0.003)


def test_no_difference_is_not_distinguishable():
    rng = np.random.default_rng(0)
    a = rng.random(1000)
    b = a.copy()
    rng.shuffle(b)  # same values, pairing broken: zero mean difference
    assert paired_bootstrap(a, b, resamples=2000).verdict == "not distinguishable"
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:10])
