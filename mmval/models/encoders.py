"""Per-modality encoders: each maps one modality's input to a feature vector h_m.

`mlp` for vectors (features, multi-view descriptors); `resnet18` (torchvision, random init or a
local weights file) for spectrograms [T, F], frame stacks [K, H, W, 3] and optical flow
[K, H, W, 2], pooled over time and space as the OGM-GE code does.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from torch import nn

from mmval.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MLPEncoderConfig(BaseModel):
    """An MLP for vector inputs (features, multi-view descriptors)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default=[256], description="hidden layer sizes")
    out_dim: int = Field(default=128, ge=1, description="size of the feature h_m")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class ResNet18EncoderConfig(BaseModel):
    """torchvision ResNet-18 trunk: 1 input channel for spectrograms, 3 for RGB frames, 2 for
    optical flow; frames go through the 2D network one by one, then are pooled over time."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["resnet18"] = "resnet18"
    pretrained: Path | None = Field(
        default=None,
        description="local torchvision resnet18 state dict (never downloaded); conv1 is "
        "averaged over its input channels when the modality has other than 3",
    )


def _encoder_kind(value: Any) -> str:
    kind = value.get("kind", "mlp") if isinstance(value, dict) else getattr(value, "kind", "mlp")
    return str(kind)


EncoderConfig = Annotated[
    Annotated[MLPEncoderConfig, Tag("mlp")] | Annotated[ResNet18EncoderConfig, Tag("resnet18")],
    Discriminator(_encoder_kind),
]


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


class ResNet18Encoder(nn.Module):
    def __init__(self, in_shape: list[int], config: ResNet18EncoderConfig) -> None:
        super().__init__()
        if len(in_shape) == 4:  # frames [K, H, W, C], uint8
            self.frames, channels = True, in_shape[-1]
        elif len(in_shape) == 2:  # spectrogram [T, F]
            self.frames, channels = False, 1
        else:
            raise UserError(
                f"resnet18 takes frames [K, H, W, C] or spectrograms [T, F], not shape {in_shape}."
            )
        net = torchvision.models.resnet18(weights=None)
        if config.pretrained is not None:
            net.load_state_dict(_load_weights(config.pretrained))
        if channels != 3:
            conv = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                conv.weight.copy_(net.conv1.weight.mean(1, keepdim=True).expand_as(conv.weight))
            net.conv1 = conv
        self.trunk = nn.Sequential(*list(net.children())[:-2])  # up to layer4
        self.rgb = channels == 3 and self.frames
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frames:
            return F.adaptive_avg_pool2d(self.trunk(x.float().unsqueeze(1)), 1).flatten(1)
        batch, k = x.shape[:2]
        images = x.flatten(0, 1).permute(0, 3, 1, 2).float().div(255.0)
        if self.rgb:
            images = (images - self.mean) / self.std
        maps = self.trunk(images)  # [B*K, 512, h, w]
        maps = maps.view(batch, k, *maps.shape[1:]).transpose(1, 2)  # [B, 512, K, h, w]
        return F.adaptive_avg_pool3d(maps, 1).flatten(1)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"pretrained weights {path} do not exist (mmval never downloads weights).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_encoder(
    in_shape: list[int], config: MLPEncoderConfig | ResNet18EncoderConfig
) -> nn.Module:
    if isinstance(config, ResNet18EncoderConfig):
        return ResNet18Encoder(in_shape, config)
    return MLPEncoder(in_shape, config)
