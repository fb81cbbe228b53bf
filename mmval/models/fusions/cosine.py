"""Cosine (MMCosine): per-modality cosine logits against a bias-free concat head, summed."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmval.models.fusions.base import FusionConfig


class CosineFusion(nn.Module):
    """MMCosine (Xu et al., ICASSP 2023; GeWu-Lab/MMCosine_ICASSP23 `main_CD.py`): each
    modality's logits are s * cos(h_m, w_{m,c}) against its slice of a bias-free concat head,
    z = sum_m z_m; features and weights are L2-normalised so no modality wins by norm."""

    def __init__(self, dims: dict[str, int], num_classes: int, scale: float) -> None:
        super().__init__()
        self.names = list(dims)
        self.dims = [dims[m] for m in self.names]
        self.fc = nn.Linear(sum(self.dims), num_classes, bias=False)
        self.scale = scale

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = torch.split(self.fc.weight, self.dims, dim=1)
        return {
            m: self.scale * F.normalize(feats[m], dim=1) @ F.normalize(w, dim=1).T
            for m, w in zip(self.names, weights, strict=True)
        }

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).sum(0)


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
        return CosineFusion(dims, num_classes, self.scale)
