"""Late (decision) fusion: per-modality heads, the fused logits their mean."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from mmval.models.fusions.base import FusionConfig
from mmval.models.fusions.sum import SumFusion


class LateFusion(SumFusion):
    """Decision fusion: one head per modality, z = (1/M) sum_m z_m (the logit average of
    late fusion / UME-style ensembles)."""

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).mean(0)


class LateFusionConfig(FusionConfig):
    name: Literal["late"] = "late"
    source: ClassVar[str] = (
        "QingyangZhang/QMF@fe6c4c6ef7cb23f0a89594ee413d485f1854268b (its latefusion baseline)"
    )
    decomposable: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return LateFusion(dims, num_classes)
