"""A score per sample (CMU-MOSI / MOSEI sentiment in [-3, 3]), as MMSA and MulT train and
report it: L1 loss (MulT `main.py` 147; MMSA's regression trainers, e.g. `trains/singleTask/
TFN.py` 16), selection on the lowest validation error (MulT `src/train.py` 248-251; MMSA
`KeyEval: Loss`), the metrics of `regression_metrics`.

Valuation has no class to be right about, so two benefits are ours [ours]:
- `abs_error` (default): v(S) = -|f_S(x) - y|. A Shapley value is then each modality's share
  of the drop in absolute error from the empty set to all modalities (efficiency:
  sum_m phi_m = |f_empty - y| - |f_all - y|).
- `acc2`: Wei et al.'s `correct` benefit with Acc-2 (non-neutral) correctness: v(S) = |S| if
  the sign of f_S(x) is that of y, else 0; samples with y = 0 have no sign and get v = 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.lazy import lazy_module
from mmval.metrics import regression_metrics
from mmval.tasks.base import Outcome, Task, TaskConfig

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
else:
    F = lazy_module("torch.nn.functional")


class RegressionConfig(TaskConfig):
    name: Literal["regression"] = "regression"
    loss: Literal["l1", "mse"] = Field(
        default="l1",
        description="l1 (MulT, most MMSA trainers) or mse (MMSA's MISA and ALMT trainers)",
    )


def _scores(logits: torch.Tensor) -> torch.Tensor:
    """[..., 1] head outputs -> [...] predicted scores."""
    return logits[..., 0]


class Regression(Task):
    Config = RegressionConfig
    config: RegressionConfig
    kind = "regression"
    selected_on = "mae"
    higher_is_better = False
    headline = ("mae", "corr", "acc7", "acc2_non0", "f1_non0")
    train_figure = "mae"
    subset_metrics = ("abs_error",)
    benefits: ClassVar[tuple[str, ...]] = ("abs_error", "acc2")

    def out_dim(self) -> int:
        return 1

    def scores(self, batch: Batch) -> torch.Tensor:
        """The true scores [B] (stored as [B, 1])."""
        return self.target(batch).reshape(len(batch)).float()

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        error = F.l1_loss if self.config.loss == "l1" else F.mse_loss
        return error(_scores(logits).float(), self.scores(batch))

    def train_score(self, logits: torch.Tensor, batch: Batch) -> float:
        return float((_scores(logits).float() - self.scores(batch)).abs().sum())

    def collect(self, logits: torch.Tensor, batch: Batch) -> dict[str, np.ndarray]:
        return {
            "label": batch.label.cpu().numpy(),
            "target": self.scores(batch).cpu().numpy(),
            "pred": _scores(logits).float().cpu().numpy(),
        }

    def metrics(
        self,
        collected: dict[str, np.ndarray],
        unimodal: dict[str, dict[str, np.ndarray]],
        prefix: str,
    ) -> dict[str, float]:
        truth = collected["target"]
        row = {f"{prefix}_{k}": v for k, v in regression_metrics(collected["pred"], truth).items()}
        for m, own in unimodal.items():
            row[f"{prefix}_mae_{m}"] = float(np.mean(np.abs(own["pred"] - truth)))
        return row

    def prediction_columns(self, collected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "label": collected["label"],
            "target": collected["target"],
            "pred": collected["pred"],
        }

    def outcome(
        self,
        logits: torch.Tensor,
        batch: Batch,
        keep: torch.Tensor,
        benefit: str,
        confidences: bool = False,
    ) -> Outcome:
        pred = _scores(logits).double()
        truth = self.scores(batch).double()[None]
        if benefit == "acc2":
            right = ((pred > 0) == (truth > 0)) & (truth != 0)
            value = right.double() * keep.sum(-1).double()
        else:
            value = -(pred - truth).abs()
        return Outcome(value, pred)

    def correct(self, pred: np.ndarray, label: np.ndarray) -> np.ndarray | None:
        """Acc-2 with zero counted positive: the label is the class of score >= 0."""
        return (pred >= 0) == (label == 1)

    def subset_columns(self, outcome: Outcome, batch: Batch) -> dict[str, torch.Tensor]:
        return {
            "abs_error": (outcome.pred - self.scores(batch).double()[None]).abs(),
            "pred": outcome.pred,
        }
