"""Plain joint training with the task's loss (cross-entropy for classification) on the fused
logits (the fusion comes from `model.fusion`): the baseline every balancing method is compared
to, for every task.

No paper and no official code of its own; the default concat head is the OGM-GE code's
(GeWu-Lab/OGM-GE_CVPR2022 @343dc1d95c9bda88f105c0da8d24f185e0e98b54,
`models/fusion_modules.py` `ConcatFusion`); spec: docs/methods.md#concat.

DDP: nothing is reduced: the loss is a batch mean of per-sample terms, so the gradients
averaged over the ranks are the global batch's.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from mmval.methods.base import Method, MethodConfig


class ConcatConfig(MethodConfig):
    name: Literal["concat"] = "concat"
    source: ClassVar[str] = (
        "none (baseline); the head as OGM-GE's ConcatFusion, "
        "GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    )
    # its only hook is the task's loss on the fused output
    tasks: ClassVar[tuple[str, ...]] = (
        "classification",
        "regression",
        "localisation",
        "segmentation",
    )


class Concat(Method):
    Config: ClassVar[type[MethodConfig]] = ConcatConfig
