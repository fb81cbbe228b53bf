"""A class per voxel: brain-tumour segmentation from MRI sequences, some of which may be
missing (BraTS 2018), as mmFormer (YaoZhang93/mmFormer b18663adbfd0323656083e0470420c8c715c1782)
and LCKD (billhhh/LCKD 5ba51b5366a74d01906cc8389855bb8e3e1ae42a) train and score it; the
losses, Dice and sliding window are in `mmval.tasks.volumes`.

- Loss: `dice_wce` (mmFormer's softmax-weighted cross-entropy + Dice over the 4 classes,
  `utils/criterions.py`) or `region_dice_bce` (LCKD's Dice + BCE on 3 sigmoid region maps ET, WT,
  TC, `loss_Dual.py`; the head then has 3 channels and a voxel's class is read from them as
  LCKD's `eval.py` does).
- Missing sequences in training (`missing`): `mmformer` draws a non-empty subset per sample
  uniformly (`data/datasets_nii.py` 98-99), `lckd` a subset of 1..M-1 sequences per batch
  (`DualNet.py` 335-342), from epoch `missing_from` on (LCKD trains with every sequence first,
  80000 steps in `run.sh`; counted in epochs here [ours]).
- Metrics: per case Dice of WT, TC, ET and ET post-processed (a predicted ET below
  `et_min_voxels` voxels emptied), averaged over cases (mmFormer `predict.py` 18-64, 197-212);
  `dice_mean`, the mean of WT, TC and ET, is what runs are selected on [ours: mmFormer and LCKD
  keep the last epoch's model; `train.protocol` decides what mmval selects].
- Evaluation on volumes larger than `patch`: mmFormer's sliding window (overlap 0.5), averaging
  the softmax (or sigmoid) outputs of the windows.
- Valuation: v(S) = the case's mean Dice of WT, TC and ET predicted from the sequences in S
  (`dice`) [ours]; the subsets table holds every region's Dice per subset, from which the
  report builds the 15-combination table of the missing-sequence papers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.lazy import lazy_module
from mmval.models import ModelOutput
from mmval.tasks.base import Outcome, Task, TaskConfig
from mmval.tasks.volumes import (
    brats_dice,
    dice_wce_loss,
    random_presence,
    region_dice_bce_loss,
    region_labels,
    sliding_window_logits,
)

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import Batch
else:
    torch = lazy_module("torch")

REGIONS = ("wt", "tc", "et")


class SegmentationConfig(TaskConfig):
    name: Literal["segmentation"] = "segmentation"
    loss: Literal["dice_wce", "region_dice_bce"] = Field(
        default="dice_wce",
        description="dice_wce: mmFormer's Dice + weighted cross-entropy over the classes; "
        "region_dice_bce: LCKD's Dice + BCE on sigmoid ET, WT, TC maps (a 3-channel head)",
    )
    missing: Literal["none", "mmformer", "lckd"] = Field(
        default="none",
        description="sequences dropped in training: mmformer (a non-empty subset per sample), "
        "lckd (1..M-1 sequences per batch), none",
    )
    missing_from: int = Field(
        default=0, ge=0, description="first epoch (0-based) with missing sequences"
    )
    et_min_voxels: int = Field(
        default=500, ge=0, description="a predicted ET smaller than this is emptied (et_post)"
    )
    patch: list[int] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="evaluate by sliding windows of this size (mmFormer: [128, 128, 128]); "
        "unset, the whole volume at once",
    )
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0, description="of the sliding windows")


class Segmentation(Task):
    Config = SegmentationConfig
    config: SegmentationConfig
    kind = "segmentation"
    selected_on = "dice_mean"
    headline = ("dice_wt", "dice_tc", "dice_et", "dice_mean")
    train_figure = "dice_mean"
    subset_metrics = ("dice_wt", "dice_tc", "dice_et")
    benefits: ClassVar[tuple[str, ...]] = ("dice",)

    def out_dim(self) -> int:
        return 3 if self.config.loss == "region_dice_bce" else self.num_classes

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.config.loss == "region_dice_bce":
            return region_dice_bce_loss(logits, self.target(batch))
        return dice_wce_loss(logits, self.target(batch), self.num_classes)

    def train_forward(self, model: torch.nn.Module, batch: Batch, epoch: int) -> ModelOutput:
        if self.config.missing == "none" or epoch < self.config.missing_from:
            return model(batch.inputs)
        present = random_presence(len(batch), len(model.modalities), self.config.missing)
        return model(batch.inputs, present=present.to(batch.label.device))

    def eval_forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        if self.config.patch is None:
            return model(inputs)
        region = self.config.loss == "region_dice_bce"

        def averaged(crops: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = model(crops).logits.float()
            return logits.sigmoid() if region else logits.softmax(1)

        mean = sliding_window_logits(averaged, inputs, self.config.patch, self.config.overlap)
        # back to scores whose argmax (softmax) or sign (sigmoid) is the averaged prediction's
        scores = torch.logit(mean, eps=1e-6) if region else mean.clamp_min(1e-12).log()
        return ModelOutput(scores, {}, None)

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """The class map [..., D, H, W] of head outputs [..., C, D, H, W]."""
        if self.config.loss == "region_dice_bce":
            return region_labels(logits.flatten(0, -5)).view(*logits.shape[:-4], *logits.shape[-3:])
        return logits.argmax(-4)

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-case Dice of every region (and their mean) for logits [B, C, D, H, W]."""
        found = brats_dice(self.labels(logits), target, self.config.et_min_voxels)
        scores = {f"dice_{region}": values for region, values in found.items()}
        scores["dice_mean"] = np.mean([found[r] for r in REGIONS], axis=0)
        return scores

    def train_score(self, logits: torch.Tensor, batch: Batch) -> float:
        return float(self._dice(logits.detach(), self.target(batch))["dice_mean"].sum())

    def collect(self, logits: torch.Tensor, batch: Batch) -> dict[str, np.ndarray]:
        return {
            "label": batch.label.cpu().numpy(),
            **self._dice(logits, self.target(batch)),
        }

    def metrics(
        self,
        collected: dict[str, np.ndarray],
        unimodal: dict[str, dict[str, np.ndarray]],
        prefix: str,
    ) -> dict[str, float]:
        names = [f"dice_{region}" for region in (*REGIONS, "et_post", "mean")]
        return {f"{prefix}_{name}": _mean(collected[name]) for name in names}

    def prediction_columns(self, collected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(collected)

    def outcome(
        self,
        logits: torch.Tensor,
        batch: Batch,
        keep: torch.Tensor,
        benefit: str,
        confidences: bool = False,
    ) -> Outcome:
        k, b = keep.shape[:2]
        target = self.target(batch).repeat(
            k, *([1] * (self.target(batch).dim() - 1))
        )  # [K * B, ...]
        scores = {
            name: torch.from_numpy(values).view(k, b).to(keep.device)
            for name, values in self._dice(logits.flatten(0, 1), target).items()
        }
        mean = scores.pop("dice_mean")
        return Outcome(mean, mean, extra=scores)

    def subset_columns(self, outcome: Outcome, batch: Batch) -> dict[str, torch.Tensor]:
        return {**outcome.extra, "dice_mean": outcome.pred}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
