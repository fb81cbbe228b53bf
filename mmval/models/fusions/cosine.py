"""Cosine (MMCosine): per-modality cosine logits against a bias-free concat head, summed."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class CosineFusionConfig(FusionConfig):
    name: Literal["cosine"] = "cosine"
    source: ClassVar[str] = "GeWu-Lab/MMCosine_ICASSP23@00ba0a9cbd9b866b5017e972a1266d7b664bf86e"
    decomposable: ClassVar[bool] = True
    additive: ClassVar[bool] = True
    flat_fields: ClassVar[dict[str, str]] = {"fusion_scale": "scale"}
    scale: float = Field(
        default=10.0, gt=0, description="cosine fusion: logit scale s (MMCosine official 10)"
    )

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import CosineFusion

        return CosineFusion(dims, num_classes, self.scale)
