"""ReconBoost: alternating boosting over modalities, with a global rectification step.

Paper: Hua et al., "ReconBoost: Boosting Can Achieve Modality Reconcilement", ICML 2024.
Follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark, `balancemm/trainer/ReconBoost_trainer.py`,
`fit`, `train_loop`, `training_step1` and `training_step2`, and `BaseClassifierReconBoostModel`
in `balancemm/models/avclassify_model.py`; defaults from `configs/trainer_config.yaml`,
ReconBoost); spec: ../shared/specs/methods-baselines.md, section 6. The official repository of
the paper was not found, so BalanceBenchmark is the only code followed.

What it changes: the step (two optimizer steps per batch). Epoch e trains the learner of
modality m = modalities[e mod M]; with z_m its logits, F_{-m} the sum of the other modalities'
logits (detached) and C the number of classes, each batch first takes a boosting step on
  L_boost = mean_b (1/C) (-w1 + w2 softmax(F_{-m})[y]) log softmax(z_m)[y]
            + alpha MSE(softmax z_m, softmax z_prev)  (from the second round on),
z_prev being the learner of the modality trained just before (its output detached), so m
learns most where the others are wrong; only m's encoder runs with gradients. Then a global
rectification step on CE(z, y) of the model's fused logits. Outside the modulation window
(0-based, inclusive) the step is plain training.

M > 2: BalanceBenchmark already cycles through any number of modalities; kept as is.

Deviations from BalanceBenchmark:
- schedule: one of its epochs runs, for each modality in turn, a full boosting pass then a full
  rectification pass. The engine runs one pass per epoch, so here an epoch is one modality's
  round, with the two steps interleaved batch by batch: M mmval epochs = 1 BalanceBenchmark
  epoch. Its "no consolidation term in epoch 0" therefore becomes "in the first M epochs";
- its consolidation term MSE(softmax z_m.detach(), softmax z_prev.detach()) is detached on both
  sides and so has no gradient at all; the paper's intent (keep the new learner from drifting
  from the previous one) is followed by letting the gradient flow through z_m;
- its ensemble is boost_rate * sum_m z_m with a learnable scalar boost_rate (init 0.01) and a
  shared linear head. Prediction here is always the model's fusion head, whose fused logits are
  the sum (or mean) of the per-modality logits: the argmax is the same for any positive scale,
  so boost_rate is left out and F_{-m} is the plain sum. For BalanceBenchmark's head, use
  `fusion: shared` with `fusion_inference: fixed`.

Needs fused logits that are the sum or mean of per-modality logits: an additive fusion, `late`,
or `shared` with fixed equal weights.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mmval.data.dataset import Batch
from mmval.methods.base import (
    Method,
    MethodConfig,
    StepResult,
    StepTools,
    TrainContext,
    too_few_modalities,
    window_problems,
)
from mmval.models import ModelConfig, MultimodalModel
from mmval.models.fusion import ADDITIVE


class ReconBoostConfig(MethodConfig):
    name: Literal["reconboost"] = "reconboost"
    alpha: float = Field(default=0.5, ge=0, description="weight of the consolidation term (0.5)")
    weight1: float = Field(default=5.0, description="w1, weight of the plain log-likelihood (5)")
    weight2: float = Field(default=1.0, description="w2, weight of the ensemble-weighted term (1)")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(default=80, ge=0, description="last modulated epoch (80)")

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        found = []
        summed = model.fusion in ADDITIVE or model.fusion == "late"
        shared_mean = (
            model.fusion == "shared"
            and model.fusion_inference == "fixed"
            and model.fusion_weights is None
        )
        if not (summed or shared_mean):
            found.append(
                (
                    "model.fusion",
                    f"reconboost needs fused logits that sum per-modality learners; {model.fusion} "
                    "fusion does not (use concat, sum, late, or shared with fusion_inference "
                    "fixed and equal weights)",
                )
            )
        found += too_few_modalities(self.name, modalities)
        found += window_problems(self.modulation_starts, self.modulation_ends)
        return found


def boosting_loss(
    z_obj: torch.Tensor, others: torch.Tensor, label: torch.Tensor, w1: float, w2: float
) -> torch.Tensor:
    """mean_b (1/C) (-w1 + w2 softmax(others)[y]) log softmax(z_obj)[y]."""
    log_p = z_obj.log_softmax(1).gather(1, label[:, None]).squeeze(1)
    q = others.detach().softmax(1).gather(1, label[:, None]).squeeze(1)
    return ((-w1 + w2 * q) * log_p).mean() / z_obj.shape[1]


class ReconBoost(Method):
    Config: ClassVar[type[MethodConfig]] = ReconBoostConfig
    config: ReconBoostConfig

    def train_step(
        self, model: MultimodalModel, batch: Batch, ctx: TrainContext, tools: StepTools
    ) -> StepResult:
        if not self.config.modulation_starts <= ctx.epoch <= self.config.modulation_ends:
            return super().train_step(model, batch, ctx, tools)
        names = model.modalities
        k = ctx.epoch % len(names)
        target, previous = names[k], names[k - 1]
        with tools.autocast():
            with torch.no_grad():
                feats = {m: model.encoders[m](batch.inputs[m]) for m in names if m != target}
            feats[target] = model.encoders[target](batch.inputs[target])
            unimodal = model.fusion.unimodal_logits(feats)
            others = torch.stack([unimodal[m] for m in names if m != target]).sum(0)
            boost = boosting_loss(
                unimodal[target], others, batch.label, self.config.weight1, self.config.weight2
            )
            if ctx.epoch >= len(names):
                boost = boost + self.config.alpha * F.mse_loss(
                    unimodal[target].softmax(1), unimodal[previous].detach().softmax(1)
                )
        tools.zero_grad()
        boost.backward()
        tools.step()
        with tools.autocast():
            out = model(batch.inputs)
            loss = F.cross_entropy(out.logits, batch.label)
        tools.zero_grad()
        loss.backward()
        tools.step()
        return StepResult(loss.detach(), out.logits.detach(), {"boost_loss": float(boost.detach())})
