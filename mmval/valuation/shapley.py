"""Exact per-sample Shapley values of modalities over all 2^M subsets.

Benefit (Wei et al., CVPR 2024): v(S) = |S| if the prediction from the modalities in S is
correct, else 0, and v(empty) = 0. A modality outside S is removed by zeroing its encoder output
before the fusion head, as the official valuation code does, so encoders run once per sample and
each subset costs one head evaluation.
"""

from __future__ import annotations

from math import factorial

import torch

from mmval.models import MultimodalModel


def subset_masks(m: int) -> torch.Tensor:
    """[2^M, M] booleans; row s has bit j of s set where modality j is in the subset."""
    codes = torch.arange(2**m)
    return (codes[:, None] >> torch.arange(m)[None, :]) & 1 == 1


def shapley_matrix(m: int) -> torch.Tensor:
    """A [2^M, M] matrix W with phi = v @ W for benefits v of shape [N, 2^M].

    phi_j = sum_{S containing j} w(|S|-1) v(S) - sum_{S not containing j} w(|S|) v(S), where
    w(s) = s! (M-s-1)! / M! is the Shapley weight of adding j to a coalition of size s.
    """
    masks = subset_masks(m)
    sizes = masks.sum(1)
    weight = torch.tensor(
        [factorial(s) * factorial(m - s - 1) / factorial(m) for s in range(m)], dtype=torch.float64
    )
    out = torch.zeros(2**m, m, dtype=torch.float64)
    for j in range(m):
        inside = masks[:, j]
        out[inside, j] = weight[sizes[inside] - 1]
        out[~inside, j] = -weight[sizes[~inside]]
    return out


@torch.no_grad()
def subset_logits(
    model: MultimodalModel, features: dict[str, torch.Tensor], masks: torch.Tensor
) -> torch.Tensor:
    """Logits [2^M, B, C] of the fusion head with modalities outside each subset zeroed,
    evaluated for all subsets in one batched head call."""
    n_subsets, batch = masks.shape[0], next(iter(features.values())).shape[0]
    keep = masks.to(next(iter(features.values())).device)
    stacked = {
        name: (feat[None] * keep[:, j].view(-1, *[1] * feat.dim()).to(feat.dtype)).flatten(0, 1)
        for j, (name, feat) in enumerate(features.items())
    }
    return model.fuse(stacked).view(n_subsets, batch, -1)


def correctness_benefit(
    logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """v(S) = |S| * [prediction of S is correct], as [B, 2^M]; v(empty) = 0."""
    correct = (logits.argmax(-1) == labels[None, :]).to(torch.float64)  # [2^M, B]
    sizes = masks.sum(1).to(torch.float64).to(correct.device)
    return (correct * sizes[:, None]).T


def exact_shapley(benefit: torch.Tensor, m: int) -> torch.Tensor:
    """Per-sample Shapley values [B, M] from benefits [B, 2^M]."""
    return benefit.to(torch.float64) @ shapley_matrix(m).to(benefit.device)
