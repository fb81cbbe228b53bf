"""Image encoders of torchvision's architectures with weights from a local file (never
downloaded): `resnet` (ResNet-18/34/50/101/152) and `vit` (ViT-B/16).

`pretrained` is a torchvision state dict of the whole network, as torchvision distributes it
(`resnet152-394f9c45.pth`: `fc.*` included) or without the classifier (`fc.*` / `heads.*`); a
file that lacks the BatchNorm `num_batches_tracked` counters loads too (torch's BatchNorm
accepts that, `torch/nn/modules/batchnorm.py` `_load_from_state_dict`). Any other missing,
unexpected or re-shaped key is a UserError naming them.

QMF's image branch is `{kind: resnet, depth: 152, embeds: 3}`: the trunk without `avgpool`
and `fc`, its map pooled to N embeddings and flattened (official code QingyangZhang/QMF,
commit fe6c4c6ef7cb23f0a89594ee413d485f1854268b, `text-image-classification/src/models/
image.py` 19-45 `ImageEncoder`, 56-58 `ImageClf.forward` flattening them), with MMBT's
normalisation statistics (`src/data/helpers.py` 30-33) as `normalize: mmbt`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from mmval.errors import UserError

# the module, not its names: encoders.py imports this module to list its configs
from mmval.models import encoders as base
from mmval.models.config import ImageStats, Normalize, ResNetEncoderConfig, Triple, ViTEncoderConfig

# QMF `src/models/image.py` 29-38: the pooled grid (rows, columns) of each num_image_embeds
QMF_GRIDS = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (5, 1), 6: (3, 2), 7: (7, 1)}
QMF_GRIDS |= {8: (4, 2), 9: (3, 3)}
# QMF `src/data/helpers.py` 30-33 (MMBT's statistics; QMF's image-text transforms use them)
MMBT_MEAN = (0.46777044, 0.44531429, 0.40661017)
MMBT_STD = (0.12221994, 0.12145835, 0.14380469)


def _stats(normalize: Normalize) -> tuple[Triple, Triple]:
    if normalize == "imagenet":
        return base.IMAGENET_MEAN, base.IMAGENET_STD
    if normalize == "mmbt":
        return MMBT_MEAN, MMBT_STD
    assert isinstance(normalize, ImageStats)
    return normalize.mean, normalize.std


def _whole_network_file(key: str) -> bool:
    """Keys a weights file may lack: BatchNorm's step counters (absent from files written
    before torch 0.4.1), and the ImageNet classifier, which the encoder drops anyway."""
    return key.endswith(".num_batches_tracked") or key.startswith(("fc.", "heads."))


class FrameInput(nn.Module):
    """Base of the image encoders: turns frames [B, K, H, W, C] (uint8) or spectrograms
    [B, T, F] into images for a 2D network as the resnet18 encoder does (RGB normalised, other
    channels scaled to [0, 1]); `rgb` and `mean` tell AGM what a blank frame is."""

    def __init__(self, in_shape: list[int], kind: str, normalize: Normalize) -> None:
        super().__init__()
        if len(in_shape) == 4:  # frames [K, H, W, C], uint8
            self.frames, self.channels = True, in_shape[-1]
        elif len(in_shape) == 2:  # spectrogram [T, F]
            self.frames, self.channels = False, 1
        else:
            raise UserError(
                f"{kind} takes frames [K, H, W, C] or spectrograms [T, F], not shape {in_shape}."
            )
        self.rgb = self.channels == 3 and self.frames
        mean, std = _stats(normalize)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frames:
            return x.float().unsqueeze(1)
        images = x.flatten(0, 1).permute(0, 3, 1, 2).float().div(255.0)
        return (images - self.mean) / self.std if self.rgb else images


def _load_into(net: nn.Module, path: Path) -> None:
    base.load_state(
        net, base._load_weights(path), f"pretrained weights file {path}", _whole_network_file
    )


class ResNetEncoder(FrameInput):
    """Keys `trunk.*` as the resnet18 encoder's (torchvision's names with conv1..layer4 as
    positions 0..7 of a Sequential). Runs in stages for mid-fusion (MMTM)."""

    def __init__(self, in_shape: list[int], config: ResNetEncoderConfig) -> None:
        super().__init__(in_shape, f"resnet (depth {config.depth})", config.normalize)
        net = getattr(torchvision.models, f"resnet{config.depth}")(weights=None)
        if config.pretrained is not None:
            _load_into(net, config.pretrained)
        if self.channels != 3:
            conv = nn.Conv2d(self.channels, 64, 7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                conv.weight.copy_(net.conv1.weight.mean(1, keepdim=True).expand_as(conv.weight))
            net.conv1 = conv
        self.trunk = nn.Sequential(*list(net.children())[:-2])  # up to layer4, as QMF's
        width = net.fc.in_features  # 512 * block.expansion (torchvision resnet.py, self.fc)
        pool = nn.AdaptiveAvgPool2d if config.embed_pool == "avg" else nn.AdaptiveMaxPool2d
        self.embed_pool = pool(QMF_GRIDS[config.embeds])
        self.stage_channels = [width // 8, width // 4, width // 2, width]
        self.out_dim = config.embeds * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(self._images(x)), x.shape[0])

    # Mid-fusion (MMTM): the stem (conv1 to maxpool), then the four residual stages; maps are
    # [B, C, h, w] for spectrograms and [B*K, C, h, w] for frames.
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk[:4](self._images(x))

    def run_stage(self, i: int, t: torch.Tensor) -> torch.Tensor:
        return self.trunk[4 + i](t)

    def squeeze(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.view(batch, -1, *t.shape[1:]).mean(dim=(1, 3, 4))

    def excite(self, t: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        per_sample = t.view(gate.shape[0], -1, *t.shape[1:])
        return (per_sample * gate[:, None, :, None, None]).view_as(t)

    def pool(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """QMF's pooling: [N', C, h, w] -> grid -> [N', N, C] -> [N', N * C] (`image.py`
        42-44, `ImageClf` 57), then the mean over the frames of each sample."""
        embeds = self.embed_pool(t).flatten(2).transpose(1, 2).flatten(1)
        return embeds.view(batch, -1, embeds.shape[1]).mean(1)


class ViTEncoder(FrameInput):
    """Keys `net.*`: torchvision's names without `heads`."""

    def __init__(self, in_shape: list[int], config: ViTEncoderConfig) -> None:
        side = in_shape[1] if len(in_shape) == 4 else 0
        if len(in_shape) != 4 or in_shape[-1] != 3 or in_shape[2] != side or side % 16:
            raise UserError(
                f"vit ({config.arch}) takes square RGB frames [K, S, S, 3] with S a multiple of "
                f"16; this modality's items are {in_shape}."
            )
        super().__init__(in_shape, "vit", config.normalize)
        net = getattr(torchvision.models, config.arch)(weights=None, image_size=side)
        if config.pretrained is not None:
            state = base._load_weights(config.pretrained)
            made_for = state.get("encoder.pos_embedding")
            if made_for is not None and made_for.shape != net.encoder.pos_embedding.shape:
                patches = made_for.shape[1] - 1  # the class token's position besides patches
                raise UserError(
                    f"pretrained weights file {config.pretrained} has position embeddings for "
                    f"{patches} patches ({round(patches**0.5) * 16} x {round(patches**0.5) * 16}"
                    f" images); the data's images are {side} x {side}: prepare it at that size."
                )
            base.load_state(
                net, state, f"pretrained weights file {config.pretrained}", _whole_network_file
            )
        net.heads = nn.Identity()
        self.net = net
        self.out_dim = net.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net(self._images(x))  # [B*K, hidden]: class token after encoder.ln
        return features.view(x.shape[0], -1, features.shape[1]).mean(1)
