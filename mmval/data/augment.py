"""The recipe's `data.augment`: its settings, apart from the loader that applies them
(`mmval.data.dataset`), so that reading a recipe does not import torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FrameAugment(BaseModel):
    """Training-time augmentation of RGB frames, as the GeWu-Lab loaders do for every visual
    frame: torchvision's RandomResizedCrop (back to the stored size) and RandomHorizontalFlip,
    drawn independently per frame. Evaluation sees the stored frames unchanged (their
    `Resize((224, 224))`)."""

    model_config = ConfigDict(extra="forbid")
    crop_scale: tuple[float, float] = Field(default=(0.08, 1.0), description="area fraction")
    crop_ratio: tuple[float, float] = Field(default=(3 / 4, 4 / 3), description="aspect range")
    hflip: float = Field(default=0.5, ge=0, le=1, description="flip probability")
