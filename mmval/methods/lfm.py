"""LFM: learning-fitted weighting of classification and cross-modal alignment.

Follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark, `balancemm/trainer/LFM_trainer.py`:
`Alignment`, `getAlpha_Learnable`, `LFMTrainer.fit` and `training_step`; defaults from
`configs/trainer_config.yaml`, LFM, and the initial weights in `fit`); spec:
docs/methods.md#lfm. BalanceBenchmark's README lists LFM without a
citation and no official repository was found, so its code is the only source followed.

What it changes: the loss, with a weight learned on validation data. With z the fused logits
and z_m the per-modality logits,
  L = 2 (alpha_0 CE(z, y) + alpha_1 mean_{i<j} JS(softmax z_i, softmax z_j)),
with alpha_0 = 1 - alpha_1 and JS the Jensen-Shannon divergence (mean over the batch). alpha_1
starts at 0.05 and is updated once per epoch, before its first step, on the first quarter of
the first validation batch: alpha_1 <- clip(alpha_1 - lr_alpha * g, 0.05, 0.95), with lr_alpha
halved every 20 epochs (BalanceBenchmark halves it at epochs 20, 40, ...; the same schedule is
computed here from the epoch, so nothing but alpha_1 needs saving for resume).

The hypergradient g (deviation): BalanceBenchmark takes the Hessian-vector product
H(L_total) * grad(L_cls) and uses the mean of its entries for the first parameter tensor only,
which is not the derivative of anything with respect to alpha_1 and depends on which parameter
happens to be first. Following the method's intent (alpha_1 should grow while alignment helps
classification on held-out data more than classification's own gradient does), g is the
one-step hypergradient of the validation classification loss through one gradient step on
L_total = (1 - alpha_1) L_cls + alpha_1 L_align:
  d/d alpha_1 L_cls(theta - eta grad L_total) = -eta grad L_cls . (grad L_align - grad L_cls),
with eta absorbed into lr_alpha and the dot product averaged over the parameter entries (as
BalanceBenchmark's `.mean()` averages), all gradients on the validation batch and over all model
parameters. The model is in evaluation mode for it (BalanceBenchmark leaves it in training mode,
so dropout is drawn and BatchNorm's running statistics take in the validation batch), then is
put back in training mode.

M > 2: the alignment is averaged over all pairs of modalities (BalanceBenchmark's
`manual_combinations`). The config's `alpha`, `method` and modulation window are unused in
BalanceBenchmark's LFM and are not carried over.

Needs per-modality logits, so the fusion must be decomposable.

DDP: every rank computes the hypergradient on the same validation batch with the same weights,
and alpha_1 is then taken from rank 0 (`broadcast_object`), so all ranks train with the same
weight whatever the kernels' rounding; the loss is a batch mean, so the averaged gradients are
the global batch's.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mmval.data.dataset import Batch
from mmval.distributed import broadcast_object
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.models import ModelOutput, MultimodalModel

ALPHA_MIN, ALPHA_MAX = 0.05, 0.95


class LFMConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["lfm"] = "lfm"
    alpha_init: float = Field(
        default=0.05, ge=ALPHA_MIN, le=ALPHA_MAX, description="initial alignment weight (0.05)"
    )
    lr_alpha: float = Field(default=1e-4, ge=0, description="step size of alpha_1 (1e-4)")
    lr_alpha_halve_every: int = Field(
        default=20, ge=1, description="lr_alpha is halved every this many epochs (20)"
    )
    val_fraction: float = Field(
        default=0.25, gt=0, le=1, description="share of the first val batch used (1/4)"
    )


def js_divergence(zi: torch.Tensor, zj: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of softmax(zi) and softmax(zj), mean over the batch."""
    log_p, log_q = zi.log_softmax(1), zj.log_softmax(1)
    mid = 0.5 * (log_p.exp() + log_q.exp())
    kl_p = F.kl_div(log_p, mid, reduction="batchmean")
    kl_q = F.kl_div(log_q, mid, reduction="batchmean")
    return 0.5 * (kl_p + kl_q)


def alignment_loss(unimodal: list[torch.Tensor]) -> torch.Tensor:
    pairs = list(itertools.combinations(unimodal, 2))
    return sum(js_divergence(zi, zj) for zi, zj in pairs) / len(pairs)


def alpha_gradient(
    params: list[torch.Tensor], cls_loss: torch.Tensor, align_loss: torch.Tensor
) -> float:
    """-mean_k (grad L_cls)_k (grad L_align - grad L_cls)_k over all entries of `params`."""
    g_cls = torch.autograd.grad(cls_loss, params, retain_graph=True, materialize_grads=True)
    g_align = torch.autograd.grad(align_loss, params, materialize_grads=True)
    dot = sum(float((a * (b - a)).sum()) for a, b in zip(g_cls, g_align, strict=True))
    return -dot / sum(p.numel() for p in params)


class LFM(Method):
    Config: ClassVar[type[MethodConfig]] = LFMConfig
    config: LFMConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.alpha = self.config.alpha_init  # alpha_1, the alignment weight

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        batch = next(iter(ctx.batches("val")))
        keep = max(1, int(len(batch.label) * self.config.val_fraction))
        model.eval()
        out = model({m: x[:keep] for m, x in batch.inputs.items()})
        model.train()
        assert out.unimodal_logits is not None
        cls = F.cross_entropy(out.logits, batch.label[:keep])
        align = alignment_loss([out.unimodal_logits[m] for m in model.modalities])
        grad = alpha_gradient([p for p in model.parameters() if p.requires_grad], cls, align)
        lr = self.config.lr_alpha / 2 ** (ctx.epoch // self.config.lr_alpha_halve_every)
        self.alpha = broadcast_object(min(ALPHA_MAX, max(ALPHA_MIN, self.alpha - lr * grad)))

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        assert out.unimodal_logits is not None
        cls = F.cross_entropy(out.logits, batch.label)
        align = alignment_loss([out.unimodal_logits[m] for m in model.modalities])
        return 2 * ((1 - self.alpha) * cls + self.alpha * align)

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        return {"alpha_align": self.alpha}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state["alpha"])
