"""What every model returns (the fusion model and the 3-D U-Net alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmval.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, C] (per segment [B, T, C], per voxel [B, C, D, H, W])
    features: dict[str, torch.Tensor]  # per modality: what the fusion (or distillation) reads
    unimodal_logits: dict[str, torch.Tensor] | None  # each modality's share, where decomposable
