"""Late (decision) fusion: per-modality heads, the fused logits their mean."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class LateFusionConfig(FusionConfig):
    name: Literal["late"] = "late"
    source: ClassVar[str] = (
        "QingyangZhang/QMF@fe6c4c6ef7cb23f0a89594ee413d485f1854268b (its latefusion baseline)"
    )
    decomposable: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import LateFusion

        return LateFusion(dims, num_classes)
