"""UME: an ensemble of unimodal models, each trained alone, predicting by averaged logits.

Paper: Du, Teng, Wang, Ma, Shen, Li, Zhao, Mo, Cui, Yao, "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023 (Uni-Modal Ensemble). No official code was found and
BalanceBenchmark has no UME (docs/methods.md#ume); this
follows the paper's description.

What it changes: the loss. On a `late` fusion model (one encoder and one linear head per modality,
prediction z = (1/M) sum_m z_m), the loss is sum_m CE(z_m, y). No parameter is shared between
modalities and no loss reaches two of them, so each unimodal model gets exactly the gradients it
would get if trained alone (the optimizers used here act per parameter), and the averaged logits
are the ensemble's prediction: UME is late fusion trained with unimodal losses only.

Deviation from separate runs: the unimodal models see the same batches in the same order and are
selected together, at the epoch where the ensemble's validation accuracy is best, rather than
each at its own best epoch.

M > 2: native.

DDP: nothing is reduced: the loss is a sum of batch means of per-sample terms, so the
gradients averaged over the ranks are the global batch's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.methods.base import Method, MethodConfig, TrainContext, unimodal_cross_entropy
from mmval.models import ModelOutput

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel


class UMEConfig(MethodConfig):
    fusion: ClassVar[str] = "late"
    fusions: ClassVar[tuple[str, ...] | None] = ("late",)
    min_modalities: ClassVar[int] = 2
    name: Literal["ume"] = "ume"
    source: ClassVar[str] = "no official code found"


class UME(Method):
    Config: ClassVar[type[MethodConfig]] = UMEConfig
    config: UMEConfig

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        return unimodal_cross_entropy(out, batch.label)
