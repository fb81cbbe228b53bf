"""Small torch modules that methods build, kept out of the method files so that a recipe can be
read without importing torch; each method imports its module here when it runs. Their names
and attributes (the state-dict keys of a checkpoint) are those they had in the method files.

- `_Presence`: LCKD's (mmval.methods.lckd) model evaluated with one fixed set of sequences
  present, for the per-sequence validation Dice its teachers are chosen by (a wrapper without
  parameters).
- `BoostRate`: ReconBoost's (mmval.methods.reconboost) learnable ensemble scale, the official
  `DynamicNet.boost_rate` (huacong/ReconBoost@14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932,
  `models/dynamic_net.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mmval.models.output import ModelOutput


class _Presence(nn.Module):
    """The model with a fixed presence row for every sample, for the task's evaluation forward
    (whole volume or sliding windows)."""

    def __init__(self, model: nn.Module, row: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.row = row

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        batch = next(iter(inputs.values())).shape[0]
        return self.model(inputs, present=self.row.expand(batch, -1))


class BoostRate(nn.Module):
    """The ensemble's learnable scale b (official `DynamicNet.boost_rate`)."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(float(init)))
