"""Concatenation: one linear head on the concatenated modality features."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from mmval.models.fusions.base import FusionConfig


class ConcatFusion(nn.Module):
    """z = W[h_1; ...; h_M] + b; modality m's share is W[:, slice_m] h_m + b / M (OGM-GE code)."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.dims = [dims[m] for m in self.names]
        self.fc = nn.Linear(sum(self.dims), num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([feats[m] for m in self.names], dim=1))

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = torch.split(self.fc.weight, self.dims, dim=1)
        bias = self.fc.bias / len(self.names)
        return {m: feats[m] @ w.T + bias for m, w in zip(self.names, weights, strict=True)}


class ConcatFusionConfig(FusionConfig):
    name: Literal["concat"] = "concat"
    source: ClassVar[str] = (
        "OGM-GE's ConcatFusion, GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    decomposable: ClassVar[bool] = True
    additive: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return ConcatFusion(dims, num_classes)
