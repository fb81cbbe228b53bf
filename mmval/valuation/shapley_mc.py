"""Permutation-sampling Monte Carlo Shapley values (`--method shapley-mc`), for large M.

For each sample, N random orders of the modalities are drawn; a modality's estimate is the
mean of its marginal benefit v(prefix + j) - v(prefix) over the orders, its standard error the
standard deviation of those marginals over sqrt(N). Each order costs M - 1 subset evaluations
(the empty and full sets are shared), and the estimates of a sample still sum to
v(N) - v(empty) exactly. The orders of a sample depend only on (seed, its position in the
split), so results do not change with the batch size or the device, and a sample valued at
several epochs during training is valued with the same orders (less noise between epochs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mmval.lazy import lazy_module
from mmval.valuation.base import BatchValues, Game, ValuationMethod
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import MAX_ELEMENTS

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


class MonteCarloShapley(ValuationMethod):
    name = "shapley-mc"

    def __init__(self, config: ValuationConfig, modalities: list[str]) -> None:
        super().__init__(config, modalities)
        self.n = config.n_permutations
        self.seed = config.rng_seed

    def ranks(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, N, M]: the place of modality j in order p of each sample."""
        rows = [
            np.random.default_rng([self.seed, p]).random((self.n, self.m)).argsort(1).argsort(1)
            for p in positions.tolist()
        ]
        return torch.from_numpy(np.stack(rows))

    def value(self, game: Game) -> BatchValues:
        b, m, n = len(game.labels), self.m, self.n
        ranks = self.ranks(game.positions).to(game.labels.device)
        ends = game.play(
            torch.stack([torch.zeros(m, dtype=torch.bool), torch.ones(m, dtype=torch.bool)])
        )
        # v[p, t, i]: benefit for sample i of the first t modalities of its order p
        v = torch.empty(n, m + 1, b, dtype=torch.float64, device=ranks.device)
        v[:, 0], v[:, m] = ends.benefit[0], ends.benefit[1]
        if m > 1:
            sizes = torch.arange(1, m, device=ranks.device).view(-1, 1, 1, 1)
            step = max(1, MAX_ELEMENTS // (b * m * (m - 1)))
            for start in range(0, n, step):
                part = ranks[:, start : start + step]  # [B, c, M]
                c = part.shape[1]
                keep = (part[None] < sizes).permute(2, 0, 1, 3).reshape(c * (m - 1), b, m)
                v[start : start + c, 1:m] = game.play(keep).benefit.view(c, m - 1, b)
        per_sample = v.permute(2, 0, 1)  # [B, N, M + 1]
        marginal = per_sample.gather(2, ranks + 1) - per_sample.gather(2, ranks)  # [B, N, M]
        return BatchValues(
            contribution=marginal.mean(1),
            v_full=ends.benefit[1],
            pred=ends.pred[1],
            stderr=marginal.std(1) / math.sqrt(n),
        )
