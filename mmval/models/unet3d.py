"""A 3D U-Net for multimodal MRI with missing sequences (mmFormer- and LCKD-shaped).

Each sequence (FLAIR, T1ce, ...) is encoded on its own as a 1-channel volume; at every level the
sequences' features are masked by presence, absent ones replaced (`fill`), concatenated and
fused by a 1x1x1 convolution; one decoder with skip connections maps the fused features to
per-voxel logits. The convolutional parts follow mmFormer's (`mmformer/mmformer.py` and
`mmformer/layers.py` at YaoZhang93/mmFormer@b18663adbfd0323656083e0470420c8c715c1782): the
`Encoder` (15-55), the fusion decoder `Decoder_fuse` without its deep-supervision heads (107-175),
`general_conv3d_prenorm` blocks (instance norm, LeakyReLU 0.2, then a reflect-padded conv;
`layers.py` 26-42), kaiming-normal conv weights (`mmformer.py` 355-357). mmFormer's intra- and
inter-modal transformers and its region-aware fusion are not included [ours: convolutional only].
The LCKD variant (billhhh/LCKD@5ba51b5366a74d01906cc8389855bb8e3e1ae42a, `DualNet.py`) is one
shared encoder run on every sequence (352-353) and the mean of the present sequences' features
in place of the absent ones' (379-387).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mmval.models.config import UNet3DConfig
from mmval.models.output import ModelOutput


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """mmFormer's `general_conv3d_prenorm`: instance norm, LeakyReLU(0.2), reflect-padded conv."""
    return nn.Sequential(
        nn.InstanceNorm3d(cin),
        nn.LeakyReLU(0.2),
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode="reflect"),
    )


class _Encoder(nn.Module):
    """mmFormer's `Encoder` with `levels` levels: a conv in, then per level an optional stride-2
    conv followed by a residual pair of convs; returns every level's output."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, channels[0], 3, padding=1, padding_mode="reflect")
        self.down = nn.ModuleList(
            _conv(channels[k - 1], channels[k], stride=2) for k in range(1, len(channels))
        )
        self.blocks = nn.ModuleList(nn.Sequential(_conv(c, c), _conv(c, c)) for c in channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = [x + self.blocks[0](x)]
        for down, block in zip(self.down, self.blocks[1:], strict=True):
            x = down(outs[-1])
            outs.append(x + block(x))
        return outs


class _UpLevel(nn.Module):
    """One step of mmFormer's `Decoder_fuse`: trilinear upsampling, a conv to this level's width,
    concatenation with the fused skip, a 3x3x3 and a 1x1x1 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = _conv(cin, cout)
        self.merge = nn.Sequential(_conv(2 * cout, cout), _conv(cout, cout, kernel=1))

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(below, scale_factor=2.0, mode="trilinear", align_corners=True)
        return self.merge(torch.cat((skip, self.up(up)), dim=1))


class UNet3D(nn.Module):
    """Per-sequence encoders, per-level presence-masked fusion, one decoder with skips.

    Fusion at each level: the M sequences' features (absent ones replaced per `fill`) are
    concatenated in `modalities` order and mapped by one prenorm 1x1x1 conv to the level's width.
    mmFormer also concatenates the masked features (`MaskModal`, `mmformer.py` 302-311, 389-393)
    and LCKD the filled bottleneck features (`DualNet.py` 402); mmFormer then applies a
    1x1-3x3-1x1 block (`fusion_prenorm`, `layers.py` 150-159) where a single 1x1x1 conv is
    used here [ours].
    """

    def __init__(self, config: UNet3DConfig, modalities: list[str], num_classes: int) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("UNet3D needs at least one modality")
        self.config = config
        self.modalities = list(modalities)
        channels = [config.base * 2**k for k in range(config.levels)]
        self.channels = channels
        n = 1 if config.shared_encoder else len(modalities)
        self.encoders = nn.ModuleList(_Encoder(channels) for _ in range(n))
        self.fuse = nn.ModuleList(_conv(len(modalities) * c, c, kernel=1) for c in channels)
        self.dropout = nn.Dropout3d(config.dropout)
        self.decoder = nn.ModuleList(
            _UpLevel(channels[k + 1], channels[k]) for k in range(config.levels - 1)
        )
        self.head = nn.Conv3d(channels[0], num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight)

    def _check(
        self, inputs: dict[str, torch.Tensor], present: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Size]:
        """The presence mask [B, M] and the common input shape; raises on wrong shapes."""
        ref = next((inputs[m] for m in self.modalities if m in inputs), None)
        if ref is None:
            raise ValueError(f"UNet3D got none of its inputs {self.modalities}")
        if ref.dim() != 5 or ref.shape[1] != 1:
            raise ValueError(f"UNet3D inputs must be [B, 1, D, H, W], got {list(ref.shape)}")
        step = 2 ** (self.config.levels - 1)
        sizes = ref.shape[2:]
        if any(s % step or s < 2 * step for s in sizes):
            raise ValueError(
                f"UNet3D with {self.config.levels} levels needs D, H, W multiples of {step} and "
                f"at least {2 * step}, got {list(sizes)}"
            )
        batch = ref.shape[0]
        if present is None:
            present = torch.ones(batch, len(self.modalities), dtype=torch.bool, device=ref.device)
        elif present.shape != (batch, len(self.modalities)):
            raise ValueError(
                f"present must be [B, M] = [{batch}, {len(self.modalities)}], "
                f"got {list(present.shape)}"
            )
        present = present.to(device=ref.device, dtype=torch.bool)
        for i, m in enumerate(self.modalities):
            if not present[:, i].any():
                continue
            if m not in inputs:
                raise ValueError(f"sequence {m!r} is present in some samples but has no input")
            if inputs[m].shape != ref.shape:
                raise ValueError(
                    f"input {m!r} has shape {list(inputs[m].shape)}, expected {list(ref.shape)}"
                )
        return present, ref.shape

    def _encode(
        self, inputs: dict[str, torch.Tensor], present: torch.Tensor, shape: torch.Size
    ) -> list[torch.Tensor]:
        """Every level's features [B, M, c, d, h, w]; rows of absent sequences are zero and their
        inputs are not read (instance norm keeps each sample's result independent of which other
        samples are encoded with it)."""
        rows = [present[:, i].nonzero().squeeze(1) for i in range(len(self.modalities))]
        picked = {
            i: inputs[m].index_select(0, rows[i]).float()
            for i, m in enumerate(self.modalities)
            if len(rows[i])
        }
        if self.config.shared_encoder and picked:
            joint = self.encoders[0](torch.cat(list(picked.values())))
            parts = [level.split([len(rows[i]) for i in picked]) for level in joint]
            per_seq = {i: [part[j] for part in parts] for j, i in enumerate(picked)}
        else:
            per_seq = {i: self.encoders[i](x) for i, x in picked.items()}
        levels = []
        for k, c in enumerate(self.channels):
            blank = present.new_zeros(
                (shape[0], c, *(s // 2**k for s in shape[2:])), dtype=torch.float32
            )
            seqs = [
                blank.index_copy(0, rows[i], per_seq[i][k]) if i in per_seq else blank
                for i in range(len(self.modalities))
            ]
            levels.append(torch.stack(seqs, dim=1))
        return levels

    def forward(
        self, inputs: dict[str, torch.Tensor], present: torch.Tensor | None = None
    ) -> ModelOutput:
        """Logits [B, C, D, H, W] from the sequences marked present ([B, M] bool in `modalities`
        order; None: all); `features` maps each sequence to its bottleneck map [B, c, d, h, w]
        before fill and fusion (what LCKD distils, `DualNet.py` 359-377), zero in the rows where
        it is absent."""
        present, shape = self._check(inputs, present)
        levels = self._encode(inputs, present, shape)
        features = {m: levels[-1][:, i] for i, m in enumerate(self.modalities)}
        fused = []
        mask = present.float().view(*present.shape, 1, 1, 1, 1)
        for level, fuse in zip(levels, self.fuse, strict=True):
            if self.config.fill == "mean":
                mean = level.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
                level = torch.where(mask.bool(), level, mean)
            fused.append(fuse(level.flatten(1, 2)))
        x = self.dropout(fused[-1])
        for k in reversed(range(len(self.decoder))):
            x = self.decoder[k](x, fused[k])
        return ModelOutput(logits=self.head(x), features=features, unimodal_logits=None)
