"""Plain joint training with cross-entropy on the fused logits (the fusion comes from
`model.fusion`): the baseline every balancing method is compared to.

DDP: nothing is reduced: the loss is a batch mean of per-sample terms, so the gradients
averaged over the ranks are the global batch's.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from mmval.methods.base import Method, MethodConfig


class ConcatConfig(MethodConfig):
    name: Literal["concat"] = "concat"


class Concat(Method):
    Config: ClassVar[type[MethodConfig]] = ConcatConfig
