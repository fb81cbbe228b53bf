"""TMC: evidential per-modality heads combined by Dempster-Shafer's rule."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmval.models.fusions.base import FusionConfig


def combine_evidence(e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    """Dempster-Shafer combination of two subjective opinions, in evidence form. With
    b_m = e_m / S_m, u_m = C / S_m, TMC's b = (b1 b2 + b1 u2 + b2 u1) / (1 - K),
    u = u1 u2 / (1 - K), e = b C / u reduce exactly to e = e1 + e2 + e1 e2 / C: the
    conflict 1 - K cancels, so nothing is divided by it."""
    return e1 + e2 + e1 * e2 / e1.shape[-1]


class TMCFusion(nn.Module):
    """TMC (Han et al., ICLR 2021; hanmenghan/TMC `TMC ICLR/model.py`): per-modality evidential
    heads e_m = softplus(W_m h_m + b_m), Dirichlet alpha_m = e_m + 1, the opinions folded by
    Dempster-Shafer combination ((1 + 2) + 3) + ... The logits returned, fused and per modality,
    are log(alpha): their argmax is the argmax of the evidence (TMC's prediction) and their
    softmax is alpha / S, the Dirichlet's expected class probabilities."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def evidence(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: F.softplus(head(feats[m]).float()) for m, head in self.heads.items()}

    @staticmethod
    def combine(evidence: list[torch.Tensor]) -> torch.Tensor:
        fused = evidence[0]
        for e in evidence[1:]:
            fused = combine_evidence(fused, e)
        return fused

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: torch.log1p(e) for m, e in self.evidence(feats).items()}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.log1p(self.combine(list(self.evidence(feats).values())))


class TMCFusionConfig(FusionConfig):
    name: Literal["tmc"] = "tmc"
    source: ClassVar[str] = "hanmenghan/TMC@08d0ca4c4461b6de1cf73514d8c621598bc2b504"
    decomposable: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return TMCFusion(dims, num_classes)
