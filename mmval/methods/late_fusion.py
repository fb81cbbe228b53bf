"""Late fusion: decision-level averaging of unimodal heads, trained with unimodal supervision.

Source: the `latefusion` baseline of QMF's official code (QingyangZhang/QMF
@fe6c4c6ef7cb23f0a89594ee413d485f1854268b, `text-image-classification/src/models/late_fusion.py`
with `df=False`, and the loss of `text-image-classification/train_qmf.py` `model_forward`);
spec: docs/methods.md#late_fusion.

What it changes: the loss only. With the `late` fusion (one head per modality,
z = (1/M) sum_m z_m, the official 0.5 / 0.5 for two modalities), the objective is
CE(z) + unimodal_weight * sum_m CE(z_m); unimodal_weight 0 is plain training of that head.

Deviation: the official script adds QMF's ranking loss on the energy confidences in this mode
too, although with `df=False` the prediction never reads them; it belongs to `qmf` and is left
out here.

M > 2: native (one head and one loss term per modality).

DDP: nothing is reduced: the loss is a sum of batch means of per-sample terms, so the
gradients averaged over the ranks are the global batch's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.models import ModelOutput

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel


class LateFusionMethodConfig(MethodConfig):
    fusion: ClassVar[str] = "late"
    fusions: ClassVar[tuple[str, ...] | None] = ("late",)
    min_modalities: ClassVar[int] = 2
    tasks: ClassVar[tuple[str, ...]] = ("classification", "regression", "localisation")
    name: Literal["late_fusion"] = "late_fusion"
    source: ClassVar[str] = (
        "QingyangZhang/QMF@fe6c4c6ef7cb23f0a89594ee413d485f1854268b (its latefusion baseline)"
    )
    unimodal_weight: float = Field(
        default=1.0,
        ge=0,
        description="weight of the unimodal cross-entropies (QMF's latefusion 1; 0: CE(z) only)",
    )


class LateFusionMethod(Method):
    Config: ClassVar[type[MethodConfig]] = LateFusionMethodConfig
    config: LateFusionMethodConfig

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        assert out.unimodal_logits is not None
        unimodal = self.task.unimodal_loss(out.unimodal_logits, batch)
        return self.task.loss(out.logits, batch) + self.config.unimodal_weight * unimodal
