"""A class per time segment (audio-visual event localisation on AVE: 10 one-second segments,
28 events + background), as Tian et al.'s supervised baseline trains and scores it
(YapengTian/AVE-ECCV18 93f843fed72fb17394df76330df958b0c2dbde76, `supervised_main.py`):
`compute_acc` (lines 69-83) is the share of all segments of all videos whose argmax class is
the labelled one, background included; the best validation accuracy is kept (114-118).

Loss: `ce` (default [ours]) is cross-entropy over every segment. `official` is the baseline's
own: `MultiLabelSoftMarginLoss` applied to the softmax probabilities and the one-hot segment
labels (lines 65, 104); on [B, T, C] it is the mean over every element of the BCE of the
probabilities read as logits, which is what it computes here.

Methods that read the probability of the true class see every segment as a unit
(`class_units`). Valuation [ours, no official code]: v(S) of a clip is the mean over its
segments of the per-segment benefit (`correct`: |S| if the segment's class is right; `prob`:
the probability of its class); the pred column is the clip's segment accuracy under S.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.lazy import lazy_module
from mmval.tasks.base import Outcome, Task, TaskConfig
from mmval.tasks.classification import class_outcome

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
else:
    F = lazy_module("torch.nn.functional")


class LocalisationConfig(TaskConfig):
    name: Literal["localisation"] = "localisation"
    loss: Literal["ce", "official"] = Field(
        default="ce",
        description="ce: cross-entropy over every segment [ours]; official: Tian et al.'s "
        "MultiLabelSoftMarginLoss on the softmax probabilities",
    )


class Localisation(Task):
    Config = LocalisationConfig
    config: LocalisationConfig
    kind = "localisation"
    selected_on = "seg_acc"
    headline = ("seg_acc",)
    train_figure = "seg_acc"
    subset_metrics = ("seg_acc",)
    benefits: ClassVar[tuple[str, ...]] = ("correct", "prob")

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = self.target(batch)
        if self.config.loss == "official":
            onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
            return F.multilabel_soft_margin_loss(logits.softmax(-1), onehot)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def class_units(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.flatten(0, 1), self.target(batch).flatten()

    def train_score(self, logits: torch.Tensor, batch: Batch) -> float:
        right = logits.argmax(-1) == self.target(batch)
        return float(right.double().mean(1).sum())

    def collect(self, logits: torch.Tensor, batch: Batch) -> dict[str, np.ndarray]:
        return {
            "label": batch.label.cpu().numpy(),
            "target": self.target(batch).cpu().numpy(),
            "pred": logits.float().argmax(-1).cpu().numpy(),
        }

    def metrics(
        self,
        collected: dict[str, np.ndarray],
        unimodal: dict[str, dict[str, np.ndarray]],
        prefix: str,
    ) -> dict[str, float]:
        target = collected["target"]
        row = {f"{prefix}_seg_acc": _share(collected["pred"] == target)}
        for m, own in unimodal.items():
            row[f"{prefix}_seg_acc_{m}"] = _share(own["pred"] == target)
        return row

    def prediction_columns(self, collected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The clip's label, and its segments' true and predicted classes as lists."""
        return {
            "label": collected["label"],
            "target": list(collected["target"]),
            "pred": list(collected["pred"]),
            "seg_acc": (collected["pred"] == collected["target"]).mean(1),
        }

    def outcome(
        self,
        logits: torch.Tensor,
        batch: Batch,
        keep: torch.Tensor,
        benefit: str,
        confidences: bool = False,
    ) -> Outcome:
        k, b, t = logits.shape[:3]
        per_segment = keep[:, :, None, :].expand(k, b, t, keep.shape[-1]).flatten(1, 2)
        units = class_outcome(
            logits.flatten(1, 2),
            self.target(batch).flatten(),
            per_segment,
            benefit,
        )
        right = (units.pred == self.target(batch).flatten()[None]).double()
        return Outcome(units.benefit.view(k, b, t).mean(-1), right.view(k, b, t).mean(-1))

    def subset_columns(self, outcome: Outcome, batch: Batch) -> dict[str, torch.Tensor]:
        return {"seg_acc": outcome.pred}


def _share(right: np.ndarray) -> float:
    return float(right.mean()) if right.size else float("nan")
