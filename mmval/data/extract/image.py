"""Still images (image-text data sets): decode any common format, resize as the reference
transforms do, return uint8 RGB."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

from mmval.data.extract import ExtractionError

Resize = Literal["squash", "center-crop"]


def decode_rgb(path: Path) -> torch.Tensor:
    """The image file as RGB [3, H, W] uint8 (an animated GIF: its first frame); an empty or
    undecodable file is an ExtractionError (its sample goes to errors.parquet)."""
    data = Path(path).read_bytes()
    if not data:
        raise ExtractionError("empty image file")
    try:
        image = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
        )
    except RuntimeError as exc:
        raise ExtractionError(f"undecodable image: {exc}") from None
    return image[0] if image.ndim == 4 else image


def read_image(
    path: Path, size: tuple[int, int], resize: Resize = "squash", short_side: int = 256
) -> np.ndarray:
    """[H, W, 3] uint8. `squash`: straight to `size` (BalanceBenchmark's `Resize((224, 224))`);
    `center-crop`: short side to `short_side`, then the central `size` (QMF/MMBT's
    `Resize(256)` + `CenterCrop(224)`)."""
    image = decode_rgb(path)
    height, width = size
    x = image.unsqueeze(0).float()
    if resize == "center-crop":
        h, w = image.shape[1:]
        scale = short_side / min(h, w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        x = x[:, :, top : top + height, left : left + width]
    else:
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
