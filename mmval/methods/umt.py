"""UMT: uni-modal teachers distilled into the encoders of a jointly trained model.

Paper: Du, Teng, Wang, Ma, Shen, Li, Zhao, Mo, Cui, Yao, "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023 (Uni-Modal Teacher). No official code was found;
follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`balancemm/trainer/UMT_trainer.py`, `UMTTrainer.training_step`); spec: docs/methods.md#umt.

What it changes: the loss, L = CE(z, y) + scaling * sum_m MSE(h_m, T_m(x_m)), where h_m is the
student's pre-fusion feature and T_m a frozen teacher: the encoder of a finished `unimodal` run on
modality m, read from the checkpoint named in `method.teachers` (same encoder settings). Stage 1
(the unimodal runs) is ordinary `unimodal` training; this method is stage 2.

Deviations: BalanceBenchmark runs its teachers in train mode under no_grad (BatchNorm normalises
with batch statistics and updates running ones that are never saved); here teachers run in eval
mode, as frozen models. Its distillation window (modulation_starts/ends, 0..80 by default, i.e.
always on) is left out. The teachers are not checkpointed with the run: a resumed run reloads them
from the same files.

M > 2: native, one teacher per modality.

DDP: nothing is reduced: the loss is a batch mean of per-sample terms and every rank loads
the same frozen teachers, so the gradients averaged over the ranks are the global batch's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.methods.linear_probe import load_encoder
from mmval.models import ModelConfig, ModelOutput

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")
    nn = lazy_module("torch.nn")


class UMTConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["umt"] = "umt"
    source: ClassVar[str] = (
        "no official code found; GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3"
    )
    quick: ClassVar[dict[str, Any]] = {"method": {"teachers": "{teachers}"}}
    teachers: dict[str, Path] = Field(
        description="modality -> checkpoint (.pt) of a finished unimodal run on that modality"
    )
    scaling: float = Field(
        default=10.0, ge=0, description="weight of the distillation loss (BalanceBenchmark 10)"
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        if modalities is None:
            return []
        if set(self.teachers) != set(modalities):
            return [
                (
                    "method.teachers",
                    f"needs one teacher checkpoint per modality {modalities}, "
                    f"got {sorted(self.teachers)}",
                )
            ]
        return []


def distillation_loss(
    features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> torch.Tensor:
    """sum over modalities of the mean squared error between student and teacher features."""
    return sum(F.mse_loss(features[m], targets[m]) for m in targets)


class UMT(Method):
    Config: ClassVar[type[MethodConfig]] = UMTConfig
    config: UMTConfig

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        missing = [m for m in model.modalities if m not in self.config.teachers]
        extra = [m for m in self.config.teachers if m not in model.modalities]
        if missing or extra:
            raise UserError(
                f"method.teachers: give one teacher checkpoint (the best.pt of a unimodal run) "
                f"per modality of the model ({', '.join(model.modalities)}); "
                f"missing: {', '.join(missing) or '-'}, "
                f"not in the model: {', '.join(extra) or '-'}."
            )
        self.teachers = {}
        for m in model.modalities:
            teacher = copy.deepcopy(model.encoders[m])
            load_encoder(self.config.teachers[m], m, teacher, f"method.teachers.{m}")
            self.teachers[m] = teacher.eval().requires_grad_(False)
        # frozen and reloaded from their files on resume, so not handed to the engine
        return nn.ModuleDict()

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        with torch.no_grad():
            targets = {m: t(batch.inputs[m]) for m, t in self.teachers.items()}
        distill = distillation_loss(out.features, targets)
        return F.cross_entropy(out.logits, batch.label) + self.config.scaling * distill
