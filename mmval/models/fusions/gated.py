"""Gated fusion: the first modality gates the second (two modalities only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class GatedFusionConfig(FusionConfig):
    name: Literal["gated"] = "gated"
    source: ClassVar[str] = (
        "gated fusion (Kiela et al. 2018) as OGM-GE's GatedFusion, "
        "GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[int | None] = 2
    flat_fields: ClassVar[dict[str, str]] = {"fusion_hidden": "hidden"}
    hidden: int = Field(default=128, ge=1, description="hidden size of gated fusion")

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import GatedFusion

        return GatedFusion(dims, num_classes, self.hidden)
