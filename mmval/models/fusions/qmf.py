"""QMF: per-modality heads weighted by their energy confidence."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.models.fusions.base import FusionConfig

if TYPE_CHECKING:
    from torch import nn


class QMFFusionConfig(FusionConfig):
    name: Literal["qmf"] = "qmf"
    source: ClassVar[str] = "QingyangZhang/QMF@fe6c4c6ef7cb23f0a89594ee413d485f1854268b"
    decomposable: ClassVar[bool] = True

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        from mmval.models.fusions.heads import QMFFusion

        return QMFFusion(dims, num_classes)
