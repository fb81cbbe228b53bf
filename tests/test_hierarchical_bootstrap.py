"""The hierarchical bootstrap over seeds and test samples against an exact enumeration of
every resample of 2 seeds x 3 samples; where it and the sample-only bootstrap disagree (2 seeds
whose spread exceeds the difference); Holm's correction against a hand computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mmval.report.significance import (
    PairedPredictions,
    hierarchical_bootstrap,
    hierarchical_differences,
    holm,
    paired_bootstrap,
)


def tiny_pairs() -> list[PairedPredictions]:
    """2 seeds x 3 samples: the method is right where the baseline is wrong on seed 0, and
    wrong on one sample the baseline gets right on seed 1."""
    labels = np.array([0, 1, 2])
    return [
        PairedPredictions(labels, pred=np.array([0, 1, 0]), baseline=np.array([0, 0, 0])),
        PairedPredictions(labels, pred=np.array([0, 0, 2]), baseline=np.array([0, 1, 2])),
    ]


def exact_distribution(pairs: list[PairedPredictions]) -> tuple[np.ndarray, np.ndarray]:
    """(differences, probabilities) of every hierarchical resample, enumerated: the ordered
    seed draws, then for each drawn seed the ordered draws of its samples, all equally likely."""
    k, n = len(pairs), len(pairs[0].labels)
    gain = [(p.pred == p.labels).astype(float) - (p.baseline == p.labels) for p in pairs]
    values = []
    for seeds in itertools.product(range(k), repeat=k):
        for draws in itertools.product(itertools.product(range(n), repeat=n), repeat=k):
            per_seed = [gain[s][list(d)].mean() for s, d in zip(seeds, draws, strict=True)]
            values.append(100 * float(np.mean(per_seed)))
    return np.array(values), np.full(len(values), 1 / len(values))


def test_hierarchical_bootstrap_matches_exact_enumeration():
    pairs = tiny_pairs()
    exact, prob = exact_distribution(pairs)
    assert len(exact) == 4 * 27 * 27
    resamples = 40_000
    drawn = hierarchical_differences(pairs, "acc", resamples=resamples, seed=1)
    tolerance = 4 * math.sqrt(0.25 / resamples)  # 4 standard errors of a share
    for side in (lambda d: d <= 1e-9, lambda d: d >= -1e-9, lambda d: d > 20):
        assert np.mean(side(drawn)) == pytest.approx(prob[side(exact)].sum(), abs=tolerance)
    assert drawn.mean() == pytest.approx((prob * exact).sum(), abs=0.5)
    assert drawn.std() == pytest.approx(
        math.sqrt((prob * exact**2).sum() - (prob @ exact) ** 2), rel=0.03
    )
    observed, p = hierarchical_bootstrap(pairs, "acc", resamples=resamples, seed=1)
    assert observed == pytest.approx(100 * (1 / 3 - 1 / 3) / 2)
    share = min(prob[exact <= 1e-9].sum(), prob[exact >= -1e-9].sum())
    assert p == pytest.approx(min(1.0, 2 * share), abs=2 * tolerance)


def test_two_seeds_that_disagree_are_not_significant():
    """The issue's case: the sample bootstrap gave ‡ to a difference smaller than the spread
    of 2 seeds; the hierarchical one sees the seed that goes the other way."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    wrong = (labels + 1) % 4
    base_a = labels.copy()
    base_a[:40] = wrong[:40]
    better = labels.copy()  # seed 0: fixes all 40 (+10 points)
    worse = labels.copy()
    worse[100:116] = wrong[100:116]  # seed 1: breaks 16 (-4 points)
    pairs = [PairedPredictions(labels, better, base_a), PairedPredictions(labels, worse, labels)]
    observed, p_samples = paired_bootstrap(pairs, "acc")
    assert observed == pytest.approx(3.0) and p_samples < 0.05
    observed, p_hierarchical = hierarchical_bootstrap(pairs, "acc")
    assert observed == pytest.approx(3.0) and p_hierarchical > 0.3


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.02]) == [0.02]
