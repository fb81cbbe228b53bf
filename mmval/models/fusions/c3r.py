"""The C3R head: the paper's representation learner on the concatenated modality features.

C3R (Wang et al., ICML 2025, arXiv 2407.14058, App. G) inserts a small MLP after any model's
feature extractors and predicts with a linear head on its output Z:
Z = Linear(32, 64)(ELU(Linear(128, 32)(ELU(Linear(in, 128)([h_1; ...; h_M]))))), logits = h(Z).
The sizes and the ELU follow the paper (CaSN App. B.2, its parent, uses the same three layers but
splits the output into a mean and a variance; C3R's Z is deterministic). The `c3r` method adds the
training-time parts (instrument attention, counterfactual branch, risks); prediction is this
head alone, so every checkpoint is evaluated and valued the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mmval.models.fusions.base import FusionConfig

REPRESENTATION_DIM = 64  # Z in R^64 (paper)


class C3RFusion(nn.Module):
    """logits = h(Z), Z = MLP([h_1; ...; h_M]); `representation` exposes Z."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.mlp = nn.Sequential(
            nn.Linear(sum(dims.values()), 128),
            nn.ELU(),
            nn.Linear(128, 32),
            nn.ELU(),
            nn.Linear(32, REPRESENTATION_DIM),
        )
        self.head = nn.Linear(REPRESENTATION_DIM, num_classes)

    def representation(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Z [B, 64], the representation whose causal completeness C3R regularises."""
        return self.mlp(torch.cat([feats[m] for m in self.names], dim=1))

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.representation(feats))


class C3RFusionConfig(FusionConfig):
    name: Literal["c3r"] = "c3r"

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return C3RFusion(dims, num_classes)
