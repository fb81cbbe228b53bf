"""Sum: one linear head per modality, the fused logits their sum."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from mmval.models.fusions.base import FusionConfig


class SumFusion(nn.Module):
    """z = sum_m (W_m h_m + b_m), one linear head per modality."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: head(feats[m]) for m, head in self.heads.items()}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).sum(0)


class SumFusionConfig(FusionConfig):
    name: Literal["sum"] = "sum"
    source: ClassVar[str] = (
        "OGM-GE's SumFusion, GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    decomposable: ClassVar[bool] = True
    additive: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return SumFusion(dims, num_classes)
