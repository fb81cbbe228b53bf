"""AMCo: adaptive masking of the modality the model depends on.

Paper: Zhou et al., "Adaptive Mask Co-Optimization for Modal Dependence in Multimodal Learning",
ICASSP 2023. Follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark
@4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`balancemm/trainer/AMCo_trainer.py`, `train_loop` and `training_step`, and
`BaseClassifierAMCoModel` in `balancemm/models/avclassify_model.py`; defaults from
`configs/trainer_config.yaml`, AMCo); spec: docs/methods.md#amco.
No official repository of the paper was found.

What it changes: the training forward and the loss. Inside the modulation window (0-based,
inclusive), batch k of epoch e draws a class mask with N = int(p C) zeros at random places,
p = sin(pi/2 min(eps, k e / 10) / eps), so masking starts at nothing and grows within each
epoch (faster in later epochs). The per-modality logits z_m of every modality flagged
"dependent" are multiplied by the mask, the fused logits are their sum, and
  L = CE(z, y) + sum_m CE(z_m, y).
After the step, a modality is flagged dependent for the next batch when its share of a softmax
taken jointly over all modalities' (masked) logits, averaged over the batch, exceeds sigma.
Flags start cleared at every epoch. Outside the window, L = CE(z, y) with nothing masked.

M > 2: BalanceBenchmark's rule is already written for any number of modalities (the joint
softmax over the concatenated logits); it is used as is.

Deviations from BalanceBenchmark:
- its mask is expanded to shape [2, C] and multiplied with logits of shape [B, C], which fails
  for any batch size but 2 as soon as a modality is flagged; here the mask [C] is shared by the
  whole batch, as the per-class mask it builds is meant to be;
- its model applies an extra learnable C x C linear map (`linear_star`) to the fused logits,
  in training and at test time. Prediction here is always the model's fusion head, so it is
  left out: a linear map of the (linear) fused logits changes the parametrisation of the head,
  not the set of functions the model can represent;
- the paper masks feature units (`U`, the feature size, in the config); BalanceBenchmark masks
  logits by class, which is followed, so `U` (and the unused `alpha`, `method`) are not kept.

Needs the fused logits to be the sum of per-modality logits, so the fusion must be additive.

DDP: the shares that flag dependent modalities are averaged over the ranks (`batch_mean`), so
every rank flags the same modalities; the class mask is drawn from the global generator, in
lockstep on every rank, so the whole global batch shares one mask as in one process. The loss is
a batch mean, so the averaged gradients are the global batch's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from mmval.distributed import batch_mean
from mmval.lazy import lazy_module
from mmval.methods.base import (
    Method,
    MethodConfig,
    TrainContext,
    never_acts,
    unimodal_cross_entropy,
    window_problems,
)
from mmval.models import ModelConfig, ModelOutput

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")


class AMCoConfig(MethodConfig):
    needs_additive: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["amco"] = "amco"
    source: ClassVar[str] = (
        "no official code found; GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3"
    )
    sigma: float = Field(
        default=0.5, gt=0, lt=1, description="joint-softmax share above which a modality is masked"
    )
    eps: float = Field(default=0.3, gt=0, description="schedule value at which all classes mask")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(default=80, ge=0, description="last modulated epoch (80)")

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts("modulation_starts", self.modulation_starts, epochs, "the logit masking")


def mask_ratio(batch_in_epoch: int, epoch: int, eps: float) -> float:
    """p = sin(pi/2 min(eps, k e / 10) / eps) for batch k of epoch e (both 0-based)."""
    return math.sin(math.pi / 2 * min(eps, batch_in_epoch * epoch / 10) / eps)


def dependent_shares(unimodal: list[torch.Tensor]) -> torch.Tensor:
    """Each modality's share of a softmax over all modalities' logits, mean over the batch."""
    joint = torch.cat(unimodal, dim=1).softmax(1)
    return torch.stack([part.sum(1) for part in joint.chunk(len(unimodal), dim=1)]).mean(1)


class AMCo(Method):
    Config: ClassVar[type[MethodConfig]] = AMCoConfig
    config: AMCoConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.dependent: set[str] = set()
        self.batch_in_epoch = 0
        self.ratio = 0.0

    def _active(self, ctx: TrainContext) -> bool:
        return self.config.modulation_starts <= ctx.epoch <= self.config.modulation_ends

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        self.dependent = set()
        self.batch_in_epoch = 0

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        out = model(batch.inputs)
        if not self._active(ctx):
            return out
        assert out.unimodal_logits is not None
        self.ratio = mask_ratio(self.batch_in_epoch, ctx.epoch, self.config.eps)
        self.batch_in_epoch += 1
        zeros = int(self.ratio * self.num_classes)
        mask = torch.ones(self.num_classes, device=out.logits.device)
        mask[torch.randperm(self.num_classes)[:zeros].to(mask.device)] = 0.0
        unimodal = {
            m: z * mask if m in self.dependent else z for m, z in out.unimodal_logits.items()
        }
        logits = torch.stack(list(unimodal.values())).sum(0)
        return ModelOutput(logits, out.features, unimodal)

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        loss = F.cross_entropy(out.logits, batch.label)
        if not self._active(ctx):
            return loss
        return loss + unimodal_cross_entropy(out, batch.label)

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        if not self._active(ctx):
            return {}
        assert out.unimodal_logits is not None
        masked = len(self.dependent)
        with torch.no_grad():
            shares = dependent_shares([out.unimodal_logits[m].float() for m in model.modalities])
            shares = batch_mean(shares, len(batch))  # DDP: the global batch's
        names = model.modalities
        self.dependent = {
            m for m, s in zip(names, shares.tolist(), strict=True) if s > self.config.sigma
        }
        return {"mask_ratio": self.ratio, "masked_modalities": float(masked)}
