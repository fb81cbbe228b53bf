"""Fusion heads: features by modality -> class logits, and (where the head is decomposable) each
modality's own logits, which gradient-modulation methods need. Each file holds one fusion: its
config (the recipe's `model.fusion`, tagged by `name`, with the fusion's own settings and its
declared capabilities); its module (the head) is in `heads.py`, which `build` imports, so that
reading a recipe imports no torch. To add a fusion, write its file and list its config in
FUSIONS (or `register_fusion` it at run time)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from mmval.errors import UserError
from mmval.models.fusions.base import FusionConfig
from mmval.models.fusions.concat import ConcatFusionConfig
from mmval.models.fusions.cosine import CosineFusionConfig
from mmval.models.fusions.film import FiLMFusionConfig
from mmval.models.fusions.gated import GatedFusionConfig
from mmval.models.fusions.late import LateFusionConfig
from mmval.models.fusions.qmf import QMFFusionConfig
from mmval.models.fusions.shared import SharedFusionConfig
from mmval.models.fusions.sum import SumFusionConfig
from mmval.models.fusions.tmc import TMCFusionConfig
from mmval.models.fusions.weighted import WeightedFusionConfig
from mmval.registry import Tagged, register, tag_of

if TYPE_CHECKING:
    from torch import nn

FUSIONS: dict[str, type[FusionConfig]] = {
    tag_of(cls): cls
    for cls in (
        ConcatFusionConfig,
        SumFusionConfig,
        WeightedFusionConfig,
        FiLMFusionConfig,
        GatedFusionConfig,
        LateFusionConfig,
        CosineFusionConfig,
        SharedFusionConfig,
        QMFFusionConfig,
        TMCFusionConfig,
    )
}

# `model.fusion`: one of the fusions registered when the recipe is validated; `concat` is short
# for `{name: concat}`
FusionField = Annotated[FusionConfig, Tagged(lambda: FUSIONS, shorthand=True)]


def register_fusion(config: type[FusionConfig]) -> type[FusionConfig]:
    """Make a fusion available to recipes (under its config's `name`); returns the config."""
    register(FUSIONS, config, config)
    return config


def count_phrase(low: int, high: int | None) -> str:
    """`exactly two`, `at least two`, `one to three`: how many modalities a part takes."""
    words = ("no", "one", "two", "three", "four", "five", "six")

    def word(n: int) -> str:
        return words[n] if n < len(words) else str(n)

    if high is None:
        return f"at least {word(low)}"
    return f"exactly {word(low)}" if low == high else f"{word(low)} to {word(high)}"


def build_fusion(config: FusionConfig, dims: dict[str, int], num_classes: int) -> nn.Module:
    """The fusion head for encoders of these output sizes (by modality, in model order)."""
    if not config.takes(len(dims)):
        takes = count_phrase(config.min_modalities, config.max_modalities)
        raise UserError(
            f"model.fusion: {config.name} fusion takes {takes} modalities, the model has "
            f"{len(dims)} ({', '.join(dims)}); pick them with data.modalities or use concat."
        )
    return config.build(dims, num_classes)


__all__ = ["FUSIONS", "FusionConfig", "FusionField", "build_fusion", "register_fusion"]
