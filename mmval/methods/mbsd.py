"""MBSD: sample-weighted self-distillation between modalities.

Follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`balancemm/trainer/MBSD_trainer.py`,
`MBSDTrainer.training_step`; defaults from `configs/trainer_config.yaml`, MBSD); spec:
docs/methods.md#mbsd. BalanceBenchmark's README lists MBSD without a
citation and no official repository was found, so its code is the only source followed.

What it changes: the loss. Inside the modulation window (0-based, inclusive), with z_m the
per-modality logits, p_m = softmax(z_m)[y] the true-class probability and, for a pair (i, j),
ps = max(p_i, p_j), pw = min(p_i, p_j) and the sample weight w = ps - pw when at least one of
the two predicts the label (0 otherwise),
  L = CE(z, y) + sum_m CE(z_m, y) + mean_pairs mean_b w [ (1/C) ||z_i - z_j||^2 + KL ],
  KL = pw (log pw - log ps)  (F.kl_div(log ps, pw)),
so samples on which one modality is right and clearly more confident pull the two modalities'
predictions together. Outside the window, L = CE(z, y).

M > 2: BalanceBenchmark's three-modality branch averages the pair terms over the three pairs;
here over all M(M-1)/2 pairs, which for M = 2 is exactly the two-modality formula.

Deviations from BalanceBenchmark, each a bug there:
- its KL is `F.kl_div(ps, pw)` with the probability ps passed where kl_div expects a log
  probability; the log is taken here, so the term is the KL contribution it is named for;
- its weight w is filled by index assignment from tensors that carry gradients, so w is
  differentiated too; here w is a detached per-sample weight, as a weight is meant;
- its three-modality branch takes the squared distance between probabilities instead of logits;
  the logits of the two-modality branch (and its ||z_1 - z_2||^2) are used for every M.

Needs per-modality logits, so the fusion must be decomposable.

DDP: nothing is reduced: every term is a batch mean of per-sample terms (the weights w are
per sample), so the gradients averaged over the ranks are the global batch's.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

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


class MBSDConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["mbsd"] = "mbsd"
    source: ClassVar[str] = (
        "no official code found; GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3"
    )
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(default=80, ge=0, description="last modulated epoch (80)")

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts(
            "modulation_starts", self.modulation_starts, epochs, "the self-distillation loss"
        )


def pair_distillation(zi: torch.Tensor, zj: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """mean_b w_b [(1/C) ||zi - zj||^2 + KL_b] for one pair of per-modality logits [B, C]."""
    log_pi = zi.log_softmax(1).gather(1, label[:, None]).squeeze(1)
    log_pj = zj.log_softmax(1).gather(1, label[:, None]).squeeze(1)
    log_strong = torch.maximum(log_pi, log_pj)  # logs taken before the max: never log(0)
    strong, weak = log_strong.exp(), torch.minimum(log_pi, log_pj).exp()
    either_right = (zi.argmax(1) == label) | (zj.argmax(1) == label)
    weight = torch.where(either_right, strong - weak, torch.zeros_like(strong)).detach()
    distance = (zi - zj).pow(2).sum(1) / zi.shape[1]
    kl = F.kl_div(log_strong, weak, reduction="none")
    return (weight * (distance + kl)).mean()


def mbsd_loss(
    logits: torch.Tensor, unimodal: list[torch.Tensor], label: torch.Tensor
) -> torch.Tensor:
    pairs = list(itertools.combinations(unimodal, 2))
    distill = sum(pair_distillation(zi, zj, label) for zi, zj in pairs) / len(pairs)
    ce = F.cross_entropy(logits, label) + sum(F.cross_entropy(z, label) for z in unimodal)
    return ce + distill


class MBSD(Method):
    Config: ClassVar[type[MethodConfig]] = MBSDConfig
    config: MBSDConfig

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        if not self.config.modulation_starts <= ctx.epoch <= self.config.modulation_ends:
            return F.cross_entropy(out.logits, batch.label)
        assert out.unimodal_logits is not None
        unimodal = [out.unimodal_logits[m] for m in model.modalities]
        return mbsd_loss(out.logits, unimodal, batch.label)
