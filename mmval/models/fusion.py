"""Fusion heads: features by modality -> class logits, and (where the head is additive over
modalities) each modality's share of the logits, which gradient-modulation methods need."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmval.errors import UserError

FusionName = Literal["concat", "sum", "weighted", "film", "gated", "late", "cosine"]
# DECOMPOSABLE heads expose each modality's logits; ADDITIVE ones fuse by summing exactly those
DECOMPOSABLE: frozenset[str] = frozenset({"concat", "sum", "weighted", "late", "cosine"})
ADDITIVE: frozenset[str] = frozenset({"concat", "sum", "weighted", "cosine"})
TWO_MODALITY_ONLY: frozenset[str] = frozenset({"film", "gated"})


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


class SumFusion(nn.Module):
    """z = sum_m (W_m h_m + b_m), one linear head per modality."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: head(feats[m]) for m, head in self.heads.items()}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).sum(0)


class WeightedFusion(SumFusion):
    """z = sum_m softmax(w)_m (W_m h_m + b_m) with learnable w (init 0). Our own definition:
    neither the official code nor BalanceBenchmark defines a 'weighted' fusion."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.mix = nn.Parameter(torch.zeros(len(dims)))

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = torch.softmax(self.mix, 0)
        return {
            m: w * head(feats[m]) for w, (m, head) in zip(weights, self.heads.items(), strict=True)
        }


class LateFusion(SumFusion):
    """Decision fusion: one head per modality, z = (1/M) sum_m z_m (the logit average of
    late fusion / UME-style ensembles)."""

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).mean(0)


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


def build_fusion(
    name: FusionName, dims: dict[str, int], num_classes: int, hidden: int, scale: float = 10.0
) -> nn.Module:
    if name in TWO_MODALITY_ONLY and len(dims) != 2:
        raise UserError(
            f"model.fusion: {name} fusion takes exactly 2 modalities, the model has {len(dims)} "
            f"({', '.join(dims)}); pick two with data.modalities or use concat."
        )
    if name == "concat":
        return ConcatFusion(dims, num_classes)
    if name == "sum":
        return SumFusion(dims, num_classes)
    if name == "weighted":
        return WeightedFusion(dims, num_classes)
    if name == "late":
        return LateFusion(dims, num_classes)
    if name == "cosine":
        return CosineFusion(dims, num_classes, scale)
    if name == "film":
        return FiLMFusion(dims, num_classes)
    return GatedFusion(dims, num_classes, hidden)
