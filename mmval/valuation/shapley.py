"""Exact per-sample Shapley values of modalities over all 2^M subsets (`--method shapley`).

Benefit of Wei et al. (CVPR 2024) by default: v(S) = |S| if the prediction from the modalities
in S is correct, else 0, so v(empty) = 0 and the values of a sample sum to v(N). With
`--benefit prob`, v(S) is the probability of the true class and v(empty) that of the model
with every modality removed; the values then sum to v(N) - v(empty) and a modality the model
ignores gets exactly 0. (Under `correct` it does not: |S| grows with the ignored modality, so it
earns a share wherever the others are right; that is the paper's definition.)
"""

from __future__ import annotations

from math import factorial
from typing import TYPE_CHECKING

from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.valuation.base import BatchValues, Game, ValuationMethod
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import subset_masks

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

MAX_EXACT_MODALITIES = 10


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


class ExactShapley(ValuationMethod):
    name = "shapley"

    def __init__(self, config: ValuationConfig, modalities: list[str]) -> None:
        super().__init__(config, modalities)
        if self.m > MAX_EXACT_MODALITIES:
            raise UserError(
                f"exact Shapley over {self.m} modalities needs 2^{self.m} subsets per sample; "
                f"at most {MAX_EXACT_MODALITIES} modalities are supported. Use --method "
                "shapley-mc (permutation sampling) instead."
            )
        self.masks = subset_masks(self.m)
        self.weights = shapley_matrix(self.m)

    def value(self, game: Game) -> BatchValues:
        out = game.play(self.masks)
        phi = out.benefit.T @ self.weights.to(out.benefit.device)
        return BatchValues(contribution=phi, v_full=out.benefit[-1], pred=out.pred[-1])
