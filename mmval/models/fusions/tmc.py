"""TMC: evidential per-modality heads combined by Dempster-Shafer's rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class TMCFusionConfig(FusionConfig):
    name: Literal["tmc"] = "tmc"
    source: ClassVar[str] = "hanmenghan/TMC@08d0ca4c4461b6de1cf73514d8c621598bc2b504"
    decomposable: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import TMCFusion

        return TMCFusion(dims, num_classes)
