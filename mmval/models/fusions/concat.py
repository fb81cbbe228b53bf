"""Concatenation: one linear head on the concatenated modality features."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class ConcatFusionConfig(FusionConfig):
    name: Literal["concat"] = "concat"
    source: ClassVar[str] = (
        "OGM-GE's ConcatFusion, GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    decomposable: ClassVar[bool] = True
    additive: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import ConcatFusion

        return ConcatFusion(dims, num_classes)
