"""Necks: modules between the encoders and the fusion head that plug-ins (mmval/plugins) add to a
model. The model only chains them; what they compute and what their loss reads is the plug-in's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
from torch import nn


class Neck(nn.Module, ABC):
    """features by modality -> features by modality of sizes `out_dims`. In training mode it
    keeps in `trace` what its plug-in's loss needs from the last forward (the plug-in clears and
    reads it around each training step)."""

    out_dims: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.trace: Any = None

    @abstractmethod
    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The features the next neck, or the fusion head, reads."""


class NeckSource(Protocol):
    """What builds a neck (a plug-in's config)."""

    name: str

    def build_neck(self, dims: dict[str, int], num_classes: int) -> Neck: ...
