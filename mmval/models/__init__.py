"""Multimodal classifiers: one encoder per modality, a fusion head, per-modality logits.

`ModelConfig` (the recipe's `model:`) and `ModelOutput` import without torch; `MultimodalModel`
and `build_model` are read from `mmval.models.multimodal` on first access, so that checking a
recipe does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmval.models.config import ModelConfig
from mmval.models.output import ModelOutput

if TYPE_CHECKING:
    from mmval.models.multimodal import MultimodalModel, build_model

_MODEL = ("MultimodalModel", "build_model")


def __getattr__(name: str) -> Any:
    if name in _MODEL:
        from mmval.models import multimodal

        return getattr(multimodal, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ModelConfig", "ModelOutput", "MultimodalModel", "build_model"]
