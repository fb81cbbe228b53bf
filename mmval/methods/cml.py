"""CML: calibrating multimodal learning (confidence must not grow when a modality is removed).

Paper: Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, "Calibrating Multimodal Learning", ICML 2023.
Follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`balancemm/trainer/CML_trainer.py`: `conf_loss`, `CMLTrainer.training_step`; defaults from
`configs/trainer_config.yaml`); spec: docs/methods.md#cml. The authors' code (QingyangZhang/CML
@9d2496e6f37ad5571d44165da0a35b4e46c8a1e6: `miwae/train.py` stage 2, `cpm/CPM_Nets.py`
`rank_loss`) applies the penalty to missing-view models (MIWAE, CPM-Nets) and is not followed;
how it differs is listed under Deviations.

What it changes: the loss. Each epoch draws a random order of the modalities. Inside the
modulation window (0-based, inclusive), per batch, starting from the fused logits z^(0) = z,
the modalities are removed one by one in that order down to a single one: z^(i) is the fused
logits with the first i modalities' features zeroed before the head (for the concat head this is
BalanceBenchmark's z - z_removed + b/M). With conf = the largest softmax probability,
  L = (1/M) sum_{i<M} CE(z^(i), y) + lambda sum_{0<i<M} max(0, sum_b [conf(z^(i)) - conf(z^(i-1))]),
so a prediction from fewer modalities is penalised for being more confident than the one from
more. Outside the window, L = CE(z, y).

M > 2: BalanceBenchmark's two- and three-modality branches are one rule, used for any M.

Deviations: as in BalanceBenchmark (and unlike the per-sample penalty of the paper), the
confidence gap is summed over the batch before the max(0, .), so its scale grows with the batch
size. Removal is feature zeroing before the fusion head, which is defined for every fusion;
for non-concat heads that generalises BalanceBenchmark's concat-only formula. Against the
authors' code: it takes max(0, .) per sample and then sums; it counts a sample only under a
correctness condition (`miwae/train.py`: the prediction with more modalities is right, plus a
term against the detached fuller confidence where both are wrong; `cpm/CPM_Nets.py`: every
sample but those where only the smaller set is right); it draws a removal order per sample
rather than per epoch, removes a view by mean imputation of its inputs (MIWAE) rather than
zeroing its features, and weights the penalty by beta / 100 with a margin epsilon (0 by
default).

DDP: the removal order is drawn from the global generator, in lockstep on every rank, so all
ranks remove the same modalities. The confidence gap is summed over the global batch before
the max(0, .) (`differentiable_sum`), with a backward that makes the averaged gradient the
one-process gradient of the global batch's penalty; the cross-entropies are batch means.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from mmval.distributed import differentiable_sum
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts, window_problems
from mmval.models import ModelConfig, ModelOutput

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")


class CMLConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["cml"] = "cml"
    source: ClassVar[str] = (
        "GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3 (the authors' "
        "QingyangZhang/CML@9d2496e6f37ad5571d44165da0a35b4e46c8a1e6 is for missing-view models; "
        "not followed)"
    )
    lam: float = Field(default=0.1, ge=0, description="weight of the confidence penalty (0.1)")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(default=80, ge=0, description="last modulated epoch (80)")

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts(
            "modulation_starts", self.modulation_starts, epochs, "the nested-subset loss"
        )


def confidence_penalty(fewer: torch.Tensor, more: torch.Tensor) -> torch.Tensor:
    """max(0, sum_b maxprob(fewer) - maxprob(more)) for logits [B, C] (under DDP the sum runs
    over the global batch)."""
    gap = fewer.softmax(1).max(1).values - more.softmax(1).max(1).values
    return differentiable_sum(gap.sum()).clamp_min(0)


def cml_loss(nested: list[torch.Tensor], label: torch.Tensor, lam: float) -> torch.Tensor:
    """`nested`: the logits with all modalities, then with one fewer each, down to one."""
    ce = sum(F.cross_entropy(z, label) for z in nested) / len(nested)
    penalty = sum(confidence_penalty(fewer, more) for more, fewer in itertools.pairwise(nested))
    return ce + lam * penalty


class CML(Method):
    Config: ClassVar[type[MethodConfig]] = CMLConfig
    config: CMLConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.order: list[int] = []

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        self.order = torch.randperm(len(model.modalities)).tolist()

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        if not self.config.modulation_starts <= ctx.epoch <= self.config.modulation_ends:
            return F.cross_entropy(out.logits, batch.label)
        names = model.modalities
        nested = [out.logits]
        features = dict(out.features)
        for j in self.order[:-1]:
            features[names[j]] = torch.zeros_like(features[names[j]])
            nested.append(model.fuse(features))
        return cml_loss(nested, batch.label, self.config.lam)
