"""FiLM: the first modality conditions the second (two modalities only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class FiLMFusionConfig(FusionConfig):
    name: Literal["film"] = "film"
    source: ClassVar[str] = (
        "FiLM (Perez et al. 2018) as OGM-GE's FiLM, "
        "GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[int | None] = 2

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import FiLMFusion

        return FiLMFusion(dims, num_classes)
