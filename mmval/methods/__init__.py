"""Training methods. Each file holds one method: its config (the recipe's `method:` section,
tagged by `name`) and the hooks it overrides. To add a method, write its file and list its
class in METHODS; the training loop does not change."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.methods.concat import Concat
from mmval.methods.ogm_ge import OGMGE
from mmval.methods.unimodal import Unimodal

METHODS: dict[str, type[Method]] = {
    cls.Config.model_fields["name"].default: cls for cls in (Concat, Unimodal, OGMGE)
}

MethodConfigUnion = Annotated[
    Union[tuple(cls.Config for cls in METHODS.values())],  # noqa: UP007
    Field(discriminator="name"),
]


def build_method(config: MethodConfig, num_classes: int) -> Method:
    return METHODS[config.name](config, num_classes)


__all__ = ["METHODS", "Method", "MethodConfig", "MethodConfigUnion", "TrainContext", "build_method"]
