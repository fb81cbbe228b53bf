"""Per-modality encoders: each maps one modality's input to a feature vector h_m."""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class MLPEncoderConfig(BaseModel):
    """An MLP for vector inputs (features, multi-view descriptors)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default=[256], description="hidden layer sizes")
    out_dim: int = Field(default=128, ge=1, description="size of the feature h_m")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


EncoderConfig = MLPEncoderConfig


class MLPEncoder(nn.Module):
    def __init__(self, in_shape: list[int], config: MLPEncoderConfig) -> None:
        super().__init__()
        sizes = [math.prod(in_shape), *config.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for size_in, size_out in itertools.pairwise(sizes):
            layers += [nn.Linear(size_in, size_out), nn.ReLU(), nn.Dropout(config.dropout)]
        layers += [nn.Linear(sizes[-1], config.out_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = config.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


def build_encoder(in_shape: list[int], config: EncoderConfig) -> nn.Module:
    return MLPEncoder(in_shape, config)
