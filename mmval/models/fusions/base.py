"""The fusion protocol: a config (the recipe's `model.fusion`, tagged by `name`) that declares
what its head offers and builds it.

A head maps features by modality to class logits. The capabilities are what the methods' shared
checks (mmval/methods/base.py) compare with what a method needs:
- `decomposable`: the head has `unimodal_logits(feats)`, each modality's own logits;
- `additive`: the fused logits are the sum of exactly those;
- `min_modalities` / `max_modalities`: how many modalities the head takes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn


class FusionConfig(BaseModel, ABC):
    """Base of every fusion's config; subclasses fix `name` to a Literal (the tag)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    decomposable: ClassVar[bool] = False
    additive: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 1
    max_modalities: ClassVar[int | None] = None
    # the code it follows (repository@commit), or why there is none (`mmval recipe show`)
    source: ClassVar[str] = ""
    # the flat `model.fusion_<x>` fields of recipes before fusions had their own configs, and the
    # field of this config each one now is (old dumps still load, mmval/models/multimodal.py)
    flat_fields: ClassVar[dict[str, str]] = {}

    @classmethod
    def takes(cls, count: int) -> bool:
        """Whether the head is defined on `count` modalities."""
        return cls.min_modalities <= count and (
            cls.max_modalities is None or count <= cls.max_modalities
        )

    @abstractmethod
    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        """The head for encoders with these output sizes (by modality, in model order)."""
