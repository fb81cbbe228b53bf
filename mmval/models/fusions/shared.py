"""Shared head (MLA, ReconBoost): one head applied to every modality, fixed or entropy weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field

from mmval.models.fusions.base import FusionConfig
from mmval.settings import ADDED_LATER

if TYPE_CHECKING:
    from torch import nn

InferenceName = Literal["dynamic", "dynamic_batch", "fixed"]


class SharedFusionConfig(FusionConfig):
    name: Literal["shared"] = "shared"
    source: ClassVar[str] = (
        "Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation@"
        "ab6c184579f9ff390e9c9b8216c9900c2a43545b; "
        "huacong/ReconBoost@14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932"
    )
    decomposable: ClassVar[bool] = True
    flat_fields: ClassVar[dict[str, str]] = {
        "fusion_inference": "inference",
        "fusion_weights": "weights",
    }
    inference: InferenceName = Field(
        default="dynamic",
        description="shared fusion (MLA): per-sample entropy weights (dynamic), the official "
        "weights pooled over each evaluation batch (dynamic_batch), or fixed weights",
    )
    weights: dict[str, float] | None = Field(
        default=None,
        description="shared fusion with inference fixed: weight by modality (default 1/M; MLA "
        "official 0.5/0.5, three modalities a 0.35, v 0.25, t 0.4)",
    )
    hidden: Annotated[int | None, ADDED_LATER] = Field(
        default=None,
        ge=1,
        description="shared fusion: one Linear head (none; MLA), or Linear(d, hidden)-ReLU-"
        "Linear(hidden, C) (ReconBoost's official head: 256)",
    )

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import SharedFusion

        return SharedFusion(dims, num_classes, self.weights, self.inference, self.hidden)
