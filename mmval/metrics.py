"""Metrics computed from predictions (no scikit-learn dependency)."""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(pred == label)) if len(label) else float("nan")


def macro_f1(pred: np.ndarray, label: np.ndarray) -> float:
    """Mean F1 over the classes present in labels or predictions (scikit-learn's default)."""
    classes = np.union1d(pred, label)
    scores = []
    for cls in classes:
        tp = np.sum((pred == cls) & (label == cls))
        fp = np.sum((pred == cls) & (label != cls))
        fn = np.sum((pred != cls) & (label == cls))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def weighted_f1(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 per class weighted by the class's share of the labels (scikit-learn's
    `f1_score(label, pred, average="weighted")`, which MMSA reports)."""
    if not len(label):
        return float("nan")
    total = 0.0
    for cls in np.unique(label):
        tp = np.sum((pred == cls) & (label == cls))
        fp = np.sum((pred == cls) & (label != cls))
        fn = np.sum((pred != cls) & (label == cls))
        total += np.sum(label == cls) * (2 * tp / (2 * tp + fp + fn))
    return float(total / len(label))


def regression_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Sentiment-score metrics as MMSA's `__eval_mosei_regression` computes them
    (thuiar/MMSA a94e65d07fa1ae0d44e552390074b29b0898edfd, src/MMSA/utils/metricsTop.py
    lines 81-121), unrounded: MAE and Pearson correlation on the raw scores; Acc-7 and Acc-5 as
    the share of equal `np.round` (half to even) of prediction and truth clipped to [-3, 3]
    and [-2, 2]; Acc-2 and weighted F1 with zero counted positive (`has0`: >= 0 on both sides,
    every sample) and without neutral samples (`non0`: truth != 0 only, > 0 on both sides).
    MulT (yaohungt/Multimodal-Transformer a670936824ee722c8494fd98d204977a1d663c7a,
    src/eval_metrics.py) prints the `non0` pair, its F1 with the arguments swapped."""
    pred = np.asarray(pred, np.float64).reshape(-1)
    truth = np.asarray(truth, np.float64).reshape(-1)
    if not len(truth):
        return dict.fromkeys(REGRESSION_METRICS, float("nan"))
    non0 = truth != 0
    spread = np.std(pred) * np.std(truth)
    corr = float(np.corrcoef(pred, truth)[0, 1]) if spread > 0 else float("nan")
    return {
        "mae": float(np.mean(np.abs(pred - truth))),
        "corr": corr,
        "acc7": accuracy(np.round(np.clip(pred, -3, 3)), np.round(np.clip(truth, -3, 3))),
        "acc5": accuracy(np.round(np.clip(pred, -2, 2)), np.round(np.clip(truth, -2, 2))),
        "acc2_has0": accuracy(pred >= 0, truth >= 0),
        "f1_has0": weighted_f1(pred >= 0, truth >= 0),
        "acc2_non0": accuracy(pred[non0] > 0, truth[non0] > 0),
        "f1_non0": weighted_f1(pred[non0] > 0, truth[non0] > 0),
    }


REGRESSION_METRICS = (
    "mae",
    "corr",
    "acc7",
    "acc5",
    "acc2_has0",
    "f1_has0",
    "acc2_non0",
    "f1_non0",
)
