"""Gated fusion: the first modality gates the second (two modalities only)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mmval.models.fusions.base import FusionConfig


class GatedFusion(nn.Module):
    """Gated fusion (Kiela et al. 2018): z = Linear(sigmoid(Linear(h_x)) * Linear(h_y))."""

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int) -> None:
        super().__init__()
        self.x_name, self.y_name = list(dims)
        self.gate = nn.Linear(dims[self.x_name], hidden)
        self.value = nn.Linear(dims[self.y_name], hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(feats[self.x_name]))
        return self.fc(gate * self.value(feats[self.y_name]))


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
        return GatedFusion(dims, num_classes, self.hidden)
