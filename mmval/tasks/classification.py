"""One class per sample: what mmval did before tasks existed, unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from mmval.lazy import lazy_module
from mmval.metrics import accuracy, macro_f1
from mmval.tasks.base import Outcome, Task, TaskConfig

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
else:
    F = lazy_module("torch.nn.functional")


class ClassificationConfig(TaskConfig):
    name: Literal["classification"] = "classification"


def class_outcome(
    logits: torch.Tensor,
    labels: torch.Tensor,
    keep: torch.Tensor,
    benefit: str,
    confidences: bool = False,
) -> Outcome:
    """Outcomes of per-unit class logits [K, N, C] with labels [N] and subsets keep [K, N, M]:
    `prob` is the probability of the true class, `correct` Wei et al.'s |S| if the prediction
    from S is right, else 0. The softmax probabilities (true class, largest) are computed only
    for `prob` or when asked (`confidences`): over 2^M subsets they cost more than the
    encoders, and exact Shapley under `correct` needs only the predictions."""
    top_logit, pred = logits.max(-1)  # the first maximum, as argmax
    # |S| once per subset when every sample plays the same ones (`Game.play`'s expanded keep)
    size = (keep[:, :1] if keep.stride(1) == 0 else keep).sum(-1).double()
    if not confidences and benefit != "prob":
        return Outcome((pred == labels[None]).double() * size, pred)
    # softmax pieces by hand (torch.softmax is slow on a short class axis), in float32: the
    # logits are float32, so float64 arithmetic here would add digits, not accuracy
    shifted = (logits.float() - top_logit.float()[..., None]).exp_()
    total = shifted.sum(-1)
    index = labels[None, :, None].expand(logits.shape[0], -1, 1)
    confidence = (shifted.gather(-1, index)[..., 0] / total).double()
    value = confidence if benefit == "prob" else (pred == labels[None]).double() * size
    return Outcome(value, pred, confidence, total.reciprocal().double())


class Classification(Task):
    Config = ClassificationConfig
    kind = "classification"
    selected_on = "acc"
    headline = ("acc", "f1")
    train_figure = "acc"
    subset_metrics = ("correct",)
    benefits: ClassVar[tuple[str, ...]] = ("correct", "prob")

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch.label)

    def class_units(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, batch.label

    def train_score(self, logits: torch.Tensor, batch: Batch) -> float:
        return float((logits.argmax(1) == batch.label).sum())

    def collect(self, logits: torch.Tensor, batch: Batch) -> dict[str, np.ndarray]:
        return {
            "label": batch.label.cpu().numpy(),
            "pred": logits.float().argmax(1).cpu().numpy(),
        }

    def metrics(
        self,
        collected: dict[str, np.ndarray],
        unimodal: dict[str, dict[str, np.ndarray]],
        prefix: str,
    ) -> dict[str, float]:
        label = collected["label"]
        row = {
            f"{prefix}_acc": accuracy(collected["pred"], label),
            f"{prefix}_f1": macro_f1(collected["pred"], label),
        }
        for m, own in unimodal.items():
            row[f"{prefix}_acc_{m}"] = accuracy(own["pred"], label)
        return row

    def prediction_columns(self, collected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"label": collected["label"], "pred": collected["pred"]}

    def outcome(
        self,
        logits: torch.Tensor,
        batch: Batch,
        keep: torch.Tensor,
        benefit: str,
        confidences: bool = False,
    ) -> Outcome:
        return class_outcome(logits, batch.label, keep, benefit, confidences)

    def correct(self, pred: np.ndarray, label: np.ndarray) -> np.ndarray | None:
        return pred == label

    def subset_columns(self, outcome: Outcome, batch: Batch) -> dict[str, torch.Tensor]:
        assert outcome.confidence is not None
        return {
            "pred": outcome.pred,
            "correct": outcome.pred == batch.label[None],
            "p_true": outcome.confidence,
        }
