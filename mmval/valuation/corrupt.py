"""Test-time corruptions of one modality's raw input (`mmval value --corrupt MODALITY=KIND:LEVEL`),
the noisy-modality protocol of QMF, which C3R and CMoB follow.

Definitions follow QMF's official evaluation (QingyangZhang/QMF at fe6c4c6ef7cb23f0a89594ee413d
485f1854268b, `text-image-classification/src/data/helpers.py` `get_GaussianNoisetransforms`,
`get_SaltNoisetransforms`, and `src/data/dataset.py` `AddGaussianNoise`, `AddSaltPepperNoise`):
- `gaussian` at level L: with probability 0.5 per sample (`RandomApply(p=0.5)`), add noise of
  std 10 L on the 0-255 pixel scale, one map per image shared by its colour channels, then clip
  to [0, 255] and truncate to integers. Deviations: QMF reseeds `np.random.seed(0)` in every
  call, so every noised image gets the same map; here each (seed, repeat, sample) draws its own.
  QMF clips only above 255 and lets `astype(uint8)` wrap negative values around; here both ends
  are clipped. Frames of one clip get one map each. Inputs not on the pixel scale (spectrograms,
  feature vectors) get noise of std 0.1 L times the sample's own std [ours: QMF noises images
  only], so level 10 adds noise as large as the signal.
- `salt-pepper` at level L: with probability 0.5 x L / 100 per sample (`RandomApply(p=0.5)` of
  `AddSaltPepperNoise(density=0.1, p=L/100)`), 5 % of the pixels become 0 and 5 % 255, the same
  positions in every channel; non-pixel inputs take their own minimum and maximum [ours].
- `mask` at level L [ours, after C3R's 30 % area mask]: one rectangle covering L % of the area
  (images: of each frame's H x W; other inputs: of the leading axis, time for spectrograms) at a
  random place, set to 0.
Level 0 leaves the input untouched. Every draw comes from a generator seeded by (seed, repeat,
the sample's position in its split, the corruption's index), so a corrupted input is the same
whatever the batch size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError

Kind = Literal["gaussian", "salt-pepper", "mask"]
KINDS: tuple[Kind, ...] = get_args(Kind)
_SPEC = re.compile(r"^(?P<modality>[^=]+)=(?P<kind>[a-z-]+):(?P<level>[0-9.]+)$")


@dataclass(frozen=True)
class Corruption:
    modality: str
    kind: Kind
    level: float

    @classmethod
    def parse(cls, text: str) -> Corruption:
        """`image=gaussian:5`."""
        match = _SPEC.match(text.strip())
        if match is None or match["kind"] not in KINDS:
            raise UserError(
                f"--corrupt {text!r}: write MODALITY=KIND:LEVEL with KIND one of "
                f"{', '.join(KINDS)} (e.g. image=gaussian:5)."
            )
        level = float(match["level"])
        if match["kind"] == "mask" and level > 100:
            raise UserError(f"--corrupt {text!r}: a mask covers at most 100 % of the input.")
        return cls(match["modality"], match["kind"], level)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.modality}={self.kind}:{self.level:g}"


def _is_pixels(x: torch.Tensor, spec: ModalitySpec) -> bool:
    """Frames and images on the 0-255 scale, channels last."""
    return spec.encoding == "jpeg" or (x.dtype == torch.uint8 and x.dim() >= 3)


def _gaussian(x: torch.Tensor, level: float, pixels: bool, g: torch.Generator) -> torch.Tensor:
    if torch.rand((), generator=g) >= 0.5:
        return x
    if pixels:
        noise = torch.randn((*x.shape[:-1], 1), generator=g, dtype=torch.float64) * 10 * level
        return (x.double() + noise).clamp(0, 255).to(x.dtype)  # truncation, as astype
    std = x.double().std() if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.1 * level * std
    return (x.double() + noise).to(x.dtype)


def _salt_pepper(x: torch.Tensor, level: float, pixels: bool, g: torch.Generator) -> torch.Tensor:
    if torch.rand((), generator=g) >= 0.5 or torch.rand((), generator=g) >= level / 100:
        return x
    shape = (*x.shape[:-1], 1) if pixels else x.shape
    draw = torch.rand(shape, generator=g).expand(x.shape)
    low, high = (0, 255) if pixels else (x.min(), x.max())
    out = x.clone()
    out[draw < 0.05] = low
    out[(draw >= 0.05) & (draw < 0.1)] = high
    return out


def _mask(x: torch.Tensor, level: float, pixels: bool, g: torch.Generator) -> torch.Tensor:
    out = x.clone()
    share = level / 100
    if pixels:  # [..., H, W, C]: one rectangle of each frame's area
        h, w = x.shape[-3], x.shape[-2]
        mh, mw = round(h * math.sqrt(share)), round(w * math.sqrt(share))
        top = int(torch.randint(0, h - mh + 1, (), generator=g))
        left = int(torch.randint(0, w - mw + 1, (), generator=g))
        out[..., top : top + mh, left : left + mw, :] = 0
        return out
    length = x.shape[0]
    span = round(length * share)
    start = int(torch.randint(0, length - span + 1, (), generator=g))
    out[start : start + span] = 0
    return out


def _stream(*keys: int) -> int:
    """A generator seed per (seed, repeat, sample, corruption), independent across keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


_APPLY = {"gaussian": _gaussian, "salt-pepper": _salt_pepper, "mask": _mask}


def corrupt_inputs(
    inputs: dict[str, torch.Tensor],
    positions: torch.Tensor,
    corruptions: list[Corruption],
    specs: dict[str, ModalitySpec],
    *,
    seed: int,
    repeat: int,
) -> dict[str, torch.Tensor]:
    """The batch's inputs with each corruption applied to its modality, sample by sample."""
    out = dict(inputs)
    for index, corruption in enumerate(corruptions):
        if corruption.level == 0:
            continue
        x = out[corruption.modality]
        spec = specs[corruption.modality]
        if spec.encoding == "tokens" or not (x.is_floating_point() or x.dtype == torch.uint8):
            raise UserError(
                f"--corrupt {corruption}: {corruption.kind} needs an image, spectrogram or "
                f"vector input; {corruption.modality} holds {spec.encoding} {x.dtype}."
            )
        pixels = _is_pixels(x[0], spec)
        samples = []
        for row, position in zip(x.cpu(), positions.tolist(), strict=True):
            g = torch.Generator().manual_seed(_stream(seed, repeat, position, index))
            samples.append(_APPLY[corruption.kind](row, corruption.level, pixels, g))
        out[corruption.modality] = torch.stack(samples).to(x.device)
    return out


def check_corruptions(corruptions: list[Corruption], modalities: list[str]) -> None:
    unknown = sorted({c.modality for c in corruptions} - set(modalities))
    if unknown:
        raise UserError(
            f"--corrupt names {', '.join(unknown)}, which the model does not have "
            f"({', '.join(modalities)})."
        )
