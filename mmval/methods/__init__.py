"""Training methods. Each file holds one method: its config (the recipe's `method:` section,
tagged by `name`, with what the method needs declared in ClassVars) and the hooks it overrides.
To add a method, write its file and list its class in METHODS (or `register_method` it at run
time); the training loop does not change."""

from __future__ import annotations

from typing import Annotated

from mmval.methods.agm import AGM
from mmval.methods.amco import AMCo
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.methods.cml import CML
from mmval.methods.cmob import CMoB
from mmval.methods.concat import Concat
from mmval.methods.gblending import GBlending
from mmval.methods.greedy import Greedy
from mmval.methods.late_fusion import LateFusionMethod
from mmval.methods.lckd import LCKD
from mmval.methods.lfm import LFM
from mmval.methods.linear_probe import LinearProbe
from mmval.methods.mbsd import MBSD
from mmval.methods.mla import MLA
from mmval.methods.mmcooperation_fixed import MMCooperationFixed
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
from mmval.registry import Tagged, register, tag_of
from mmval.tasks import Task

METHODS: dict[str, type[Method]] = {
    tag_of(cls.Config): cls
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
        MMCooperationSample,
        MMCooperationModality,
        MMCooperationFixed,
        CMoB,
        LCKD,
    )
}

# `method:` of a recipe (and the entries of a sweep's `methods:`): one of the methods registered
# when it is validated
MethodConfigUnion = Annotated[
    MethodConfig, Tagged(lambda: {tag: cls.Config for tag, cls in METHODS.items()})
]


def register_method(cls: type[Method]) -> type[Method]:
    """Make a method available to recipes and sweeps (under its config's `name`); returns the
    class, so that it can decorate it."""
    register(METHODS, cls, cls.Config)
    return cls


def build_method(config: MethodConfig, num_classes: int, task: Task | None = None) -> Method:
    """The method of `config`, training for `task` (classification when None)."""
    method = METHODS[config.name](config, num_classes)
    if task is not None:
        method.task = task
    return method


__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "MethodConfigUnion",
    "TrainContext",
    "build_method",
    "register_method",
]
