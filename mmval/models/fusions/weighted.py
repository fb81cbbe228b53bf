"""Weighted sum: per-modality heads mixed by learnt softmax weights."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from mmval.models.fusions.base import FusionConfig
from mmval.models.fusions.sum import SumFusion


class WeightedFusion(SumFusion):
    """z = sum_m softmax(w)_m (W_m h_m + b_m) with learnable w (init 0). Our own definition:
    neither the official code nor BalanceBenchmark defines a 'weighted' fusion."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.mix = nn.Parameter(torch.zeros(len(dims)))

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = torch.softmax(self.mix, 0)
        return {
            m: w * head(feats[m]) for w, (m, head) in zip(weights, self.heads.items(), strict=True)
        }


class WeightedFusionConfig(FusionConfig):
    name: Literal["weighted"] = "weighted"
    source: ClassVar[str] = "[ours]: neither an official code nor BalanceBenchmark has one"
    decomposable: ClassVar[bool] = True
    additive: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return WeightedFusion(dims, num_classes)
