"""Paired significance tests of a method against a baseline, without SciPy.

Over matched seeds (the same seed trained with both recipes): the paired t-test (its p from the
exact finite series of Student's t distribution for integer degrees of freedom) and the exact
Wilcoxon signed-rank test. Over test samples, when both runs saved their predictions: a paired
bootstrap that resamples test samples (the same resample for every matched seed) and recomputes
the metric difference, averaged over seeds; it ignores how much the seeds disagree. The
hierarchical bootstrap does not: it resamples the matched seeds, then the test samples within
each drawn seed (Saravanan, Berman & Sober 2020, "Application of the hierarchical bootstrap to
multi-level data in neuroscience", Neurons, Behavior, Data analysis, and Theory 3(5): resample
the top level with replacement, then the next level within each drawn unit; the statistic
here, as in the report's Δ, is the mean over the drawn seeds of each seed's difference). The
report's ‡ marker reads it. Holm's step-down correction
(Holm 1979, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6)
adjusts the p-values of the methods compared with one baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom (Abramowitz & Stegun 26.7.3
    and 26.7.4: a finite sum in cos(theta), theta = atan(t / sqrt(df)))."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2 == 1:
        series, term = 0.0, c
        for j in range(1, (df - 1) // 2 + 1):
            series += term
            term *= c * c * (2 * j) / (2 * j + 1)
        inside = (2 / math.pi) * (theta + s * series)
    else:
        series, term = 0.0, 1.0
        for j in range(1, df // 2 + 1):
            series += term
            term *= c * c * (2 * j - 1) / (2 * j)
        inside = s * series
    return min(1.0, max(0.0, 1.0 - inside))


def paired_t_test(diffs: np.ndarray) -> float:
    """Two-sided p of the paired t-test on per-seed differences; nan below two pairs. Equal
    nonzero differences (no spread) give 0, all-zero differences 1."""
    diffs = np.asarray(diffs, dtype=np.float64)
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return student_t_two_sided(mean / (sd / math.sqrt(n)), n - 1)


def wilcoxon_signed_rank(diffs: np.ndarray) -> float:
    """Two-sided exact p of the Wilcoxon signed-rank test: zero differences dropped, tied
    magnitudes given their average rank, the null distribution of the positive rank sum
    counted over all 2^n sign patterns. nan without pairs; all-zero differences give 1."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if len(diffs) == 0:
        return math.nan
    d = diffs[diffs != 0]
    if len(d) == 0:
        return 1.0
    doubled = (2 * _average_ranks(np.abs(d))).round().astype(np.int64)  # integer half-ranks
    counts = np.zeros(int(doubled.sum()) + 1, dtype=np.float64)
    counts[0] = 1.0
    for r in doubled:
        counts[r:] = counts[r:] + counts[: len(counts) - r].copy()
    centre = doubled.sum() / 2
    observed = abs(doubled[d > 0].sum() - centre)
    sums = np.arange(len(counts))
    extreme = counts[np.abs(sums - centre) >= observed - 1e-9].sum()
    return float(min(1.0, extreme / counts.sum()))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


@dataclass(frozen=True)
class PairedPredictions:
    """One matched seed: labels and the two runs' predictions on the same samples, in the
    same order."""

    labels: np.ndarray
    pred: np.ndarray
    baseline: np.ndarray


def paired_bootstrap(
    pairs: list[PairedPredictions],
    metric: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(observed difference in points, two-sided p) of `metric` (`acc` or `f1`, macro over
    classes present in labels or predictions) between method and baseline, averaged over the
    seeds in `pairs`. Each resample draws test samples with replacement (as multinomial
    weights, one draw shared by all seeds); p = 2 x the smaller share of resampled differences
    on either side of 0, with the +1 correction, capped at 1."""
    labels = pairs[0].labels
    if any(len(p.labels) != len(labels) for p in pairs):
        raise ValueError("paired predictions must cover the same samples")
    n = len(labels)
    observed = _metric_difference(pairs, metric, np.ones((1, n)))[0]
    rng = np.random.default_rng(seed)
    below = above = 0
    for start in range(0, resamples, 200):
        size = min(200, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        diff = _metric_difference(pairs, metric, weights)
        below += int((diff <= 0).sum())
        above += int((diff >= 0).sum())
    p = 2 * (1 + min(below, above)) / (resamples + 1)
    return float(observed), float(min(1.0, p))


def hierarchical_differences(
    pairs: list[PairedPredictions],
    metric: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """[resamples] differences (method minus baseline, in points) of `metric`, each from one
    hierarchical resample: k seeds drawn with replacement from the k matched seeds, then for
    each drawn seed n test samples with replacement (a fresh draw per drawn seed, shared by
    the method and the baseline of that seed: the pairing), the difference averaged over the
    k drawn seeds."""
    n, k = len(pairs[0].labels), len(pairs)
    if any(len(p.labels) != n for p in pairs):
        raise ValueError("paired predictions must cover the same samples")
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for start in range(0, resamples, 200):
        size = min(200, resamples - start)
        drawn = rng.integers(k, size=(size, k))  # the seeds of each resample
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=(size, k)).astype(np.float64)
        # each seed's difference under every resample and slot that drew it, in one pass
        per_slot = np.empty((size, k))
        for s in np.unique(drawn):
            at = drawn == s
            per_slot[at] = _metric_difference([pairs[s]], metric, weights[at])
        total = np.zeros(size)
        for slot in range(k):  # summed in slot order
            total += per_slot[:, slot]
        out[start : start + size] = total / k
    return out


def hierarchical_bootstrap(
    pairs: list[PairedPredictions],
    metric: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(observed difference in points, two-sided p) from `hierarchical_differences`: p = 2 x
    the smaller share of resampled differences on either side of 0, with the +1 correction,
    capped at 1 (as `paired_bootstrap`)."""
    n = len(pairs[0].labels)
    observed = _metric_difference(pairs, metric, np.ones((1, n)))[0]
    diff = hierarchical_differences(pairs, metric, resamples=resamples, seed=seed)
    below, above = int((diff <= 0).sum()), int((diff >= 0).sum())
    p = 2 * (1 + min(below, above)) / (resamples + 1)
    return float(observed), float(min(1.0, p))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: sorted ascending, the i-th
    (from 1) of m is multiplied by m - i + 1, made non-decreasing and capped at 1; nan
    entries stay nan and do not count in m."""
    tested = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(tested)
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _metric_difference(
    pairs: list[PairedPredictions], metric: str, weights: np.ndarray
) -> np.ndarray:
    """Method minus baseline, in points, averaged over seeds, for each row of sample
    weights [R, N]."""
    total = np.zeros(len(weights))
    for pair in pairs:
        total += _weighted_metric(pair.labels, pair.pred, metric, weights)
        total -= _weighted_metric(pair.labels, pair.baseline, metric, weights)
    return 100 * total / len(pairs)


def _weighted_metric(
    labels: np.ndarray, pred: np.ndarray, metric: str, weights: np.ndarray
) -> np.ndarray:
    """Accuracy or macro-F1 of `pred` with each sample counted `weights` times: [R]."""
    if metric == "acc":
        return weights @ (pred == labels).astype(np.float64) / weights.sum(1)
    if metric != "f1":
        raise ValueError(f"no bootstrap for metric {metric!r}")
    classes = np.union1d(labels, pred)
    is_label = (labels[:, None] == classes[None, :]).astype(np.float64)  # [N, C]
    is_pred = (pred[:, None] == classes[None, :]).astype(np.float64)
    tp = weights @ (is_label * is_pred)  # [R, C]
    fp = weights @ ((1 - is_label) * is_pred)
    fn = weights @ (is_label * (1 - is_pred))
    denom = 2 * tp + fp + fn
    present = denom > 0  # a class absent from a resample does not count
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return f1.sum(1) / np.maximum(present.sum(1), 1)
