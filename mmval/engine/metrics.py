"""Classification metrics computed from predictions (no scikit-learn dependency)."""

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
