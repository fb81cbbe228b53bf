"""Weighted sum: per-modality heads mixed by learnt softmax weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class WeightedFusionConfig(FusionConfig):
    name: Literal["weighted"] = "weighted"
    source: ClassVar[str] = "[ours]: neither an official code nor BalanceBenchmark has one"
    decomposable: ClassVar[bool] = True
    additive: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import WeightedFusion

        return WeightedFusion(dims, num_classes)
