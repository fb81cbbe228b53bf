"""FiLM: the first modality conditions the second (two modalities only)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from mmval.models.fusions.base import FusionConfig


class FiLMFusion(nn.Module):
    """FiLM (Perez et al. 2018): the first modality conditions the second,
    [gamma; beta] = Linear(h_x), z = Linear(gamma * h_y + beta)."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.x_name, self.y_name = list(dims)
        self.film = nn.Linear(dims[self.x_name], 2 * dims[self.y_name])
        self.fc = nn.Linear(dims[self.y_name], num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(feats[self.x_name]).chunk(2, dim=1)
        return self.fc(gamma * feats[self.y_name] + beta)


class FiLMFusionConfig(FusionConfig):
    name: Literal["film"] = "film"
    source: ClassVar[str] = (
        "FiLM (Perez et al. 2018) as OGM-GE's FiLM, "
        "GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[int | None] = 2

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return FiLMFusion(dims, num_classes)
