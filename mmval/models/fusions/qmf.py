"""QMF: per-modality heads weighted by their energy confidence."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from mmval.models.fusions.base import FusionConfig
from mmval.models.fusions.sum import SumFusion


class QMFFusion(SumFusion):
    """QMF (Zhang et al., ICML 2023; QingyangZhang/QMF `src/models/late_fusion.py`, `df=True`):
    one head per modality, z = sum_m sg(w_m) z_m with the energy confidence
    w_m = logsumexp(z_m) / T, T = 10 as hard-coded there (sg: no gradient through w_m)."""

    temperature = 10.0

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """w [B] of one modality's logits [B, C] (with gradient; the rank loss trains it)."""
        return torch.logsumexp(logits, dim=1) / self.temperature

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.unimodal_logits(feats).values()
        return torch.stack([self.confidence(z).detach()[:, None] * z for z in logits]).sum(0)


class QMFFusionConfig(FusionConfig):
    name: Literal["qmf"] = "qmf"
    source: ClassVar[str] = "QingyangZhang/QMF@fe6c4c6ef7cb23f0a89594ee413d485f1854268b"
    decomposable: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return QMFFusion(dims, num_classes)
