"""One modality alone, through the same encoder and head as the multimodal model.

DDP: nothing is reduced: the loss is a batch mean of per-sample terms, so the gradients
averaged over the ranks are the global batch's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from mmval.methods.base import Method, MethodConfig
from mmval.models import ModelConfig


class UnimodalConfig(MethodConfig):
    # plain training on one modality: the task's loss only
    tasks: ClassVar[tuple[str, ...]] = (
        "classification",
        "regression",
        "localisation",
        "segmentation",
    )
    name: Literal["unimodal"] = "unimodal"
    source: ClassVar[str] = "none (baseline)"
    quick: ClassVar[dict[str, Any]] = {"method": {"modality": "{modality}"}}
    modality: str = Field(description="the modality to train on")

    def label(self) -> str:
        return f"unimodal:{self.modality}"

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        if modalities is not None and self.modality not in modalities:
            return [
                ("method.modality", f"{self.modality!r} is not in data.modalities {modalities}")
            ]
        return []

    def model_modalities(self, available: list[str]) -> list[str]:
        return [self.modality]


class Unimodal(Method):
    Config: ClassVar[type[MethodConfig]] = UnimodalConfig
