"""Sum: one linear head per modality, the fused logits their sum."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class SumFusionConfig(FusionConfig):
    name: Literal["sum"] = "sum"
    source: ClassVar[str] = (
        "OGM-GE's SumFusion, GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    decomposable: ClassVar[bool] = True
    additive: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import SumFusion

        return SumFusion(dims, num_classes)
