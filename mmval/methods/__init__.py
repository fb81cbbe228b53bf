"""Training methods. Each file holds one method: its config (the recipe's `method:` section,
tagged by `name`) and the hooks it overrides. To add a method, write its file and list its
class in METHODS; the training loop does not change."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from mmval.methods.agm import AGM
from mmval.methods.amco import AMCo
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.methods.c3r import C3R
from mmval.methods.cml import CML
from mmval.methods.cmob import CMoB
from mmval.methods.concat import Concat
from mmval.methods.gblending import GBlending
from mmval.methods.greedy import Greedy
from mmval.methods.imml import IMML
from mmval.methods.late_fusion import LateFusionMethod
from mmval.methods.lfm import LFM
from mmval.methods.linear_probe import LinearProbe
from mmval.methods.mbsd import MBSD
from mmval.methods.mla import MLA
from mmval.methods.mmcooperation_modality import MMCooperationModality
from mmval.methods.mmcooperation_sample import MMCooperationSample
from mmval.methods.mmcosine import MMCosine
from mmval.methods.mmpareto import MMPareto
from mmval.methods.ogm_ge import OGMGE
from mmval.methods.opm import OPM
from mmval.methods.pmr import PMR
from mmval.methods.qmf import QMF
from mmval.methods.reconboost import ReconBoost
from mmval.methods.relearning import Relearning
from mmval.methods.tmc import TMC
from mmval.methods.ume import UME
from mmval.methods.umt import UMT
from mmval.methods.unimodal import Unimodal

METHODS: dict[str, type[Method]] = {
    cls.Config.model_fields["name"].default: cls
    for cls in (
        Concat,
        Unimodal,
        OGMGE,
        AGM,
        PMR,
        MMCosine,
        OPM,
        CML,
        MMPareto,
        Relearning,
        TMC,
        QMF,
        MLA,
        LateFusionMethod,
        GBlending,
        LinearProbe,
        UME,
        UMT,
        MBSD,
        LFM,
        AMCo,
        ReconBoost,
        Greedy,
        IMML,
        C3R,
        MMCooperationSample,
        MMCooperationModality,
        CMoB,
    )
}

MethodConfigUnion = Annotated[
    Union[tuple(cls.Config for cls in METHODS.values())],  # noqa: UP007
    Field(discriminator="name"),
]


def build_method(config: MethodConfig, num_classes: int) -> Method:
    return METHODS[config.name](config, num_classes)


__all__ = ["METHODS", "Method", "MethodConfig", "MethodConfigUnion", "TrainContext", "build_method"]
