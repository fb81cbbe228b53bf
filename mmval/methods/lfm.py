"""LFM: classification and cross-modal alignment with a learned weight between them.

Paper: "Facilitating Multimodal Classification via Dynamically Learning Modality Gap", NeurIPS
2024 (the title of the official README). Follows the official code, github
njustkmg/NeurIPS24-LFM at commit ad44fa09fee471c9267a7cba526b222c54d45493:
`Crema_epoch_learnable.py` (`Alignment`, `getAlpha_Learnable`, `train_audio_video`, `val` and
the main loop), `model/AudioVideo.py` (`AVClassifier`) and `data/crema.json`; spec:
docs/methods.md#lfm.

What it changes: the loss, with a weight learned on held-out samples. With z_m the modality
heads' logits and z = (1/M) sum_m z_m the `late` fusion's (the official 0.5 o_a + 0.5 o_v, which
`val` also predicts with),
  L = 2 (alpha_0 CE(z, y) + alpha_1 JS(softmax z_a, softmax z_v)),
with JS the Jensen-Shannon divergence (mean over the batch) and alpha_0 = 1 - alpha_1. The
official code starts from cls_k = [0.05, 0.95]: 0.05 on the cross-entropy, 0.95 on the alignment.

The weight step (`getAlpha_Learnable`), once per epoch before its first step, the first epoch
included, on the same held-out samples every epoch:
  g = mean over the entries of theta_0 of H(L_total) grad L_cls,
  L_total = alpha_0 L_cls + alpha_1 L_align,
  alpha_1 <- clip(alpha_1 - lr_alpha g, 0.05, 0.95),
both losses on those samples, H the Hessian over all parameters, theta_0 the first
parameter tensor (the official `hessian_vector_prod[0]`: the audio encoder's first convolution,
the first entry of `model.parameters()`), grad L_cls held constant as in the official
`grad_outputs`. lr_alpha (1e-4) is halved at epochs 20, 40, ... (the official halving carried
from epoch to epoch, computed here from the epoch so that only alpha_1 needs saving for resume).
g is not the derivative of a validation loss with respect to alpha_1 (the one-step hypergradient
would be -eta grad L_cls . (grad L_align - grad L_cls)); it is followed as written all the same.
The model's mode is the official one: training mode before epoch 0 (the fresh model; BatchNorm
takes the batch's statistics and updates its running ones, dropout is drawn), evaluation mode
later (left by the previous epoch's test pass).

Deviations:
- held-out samples: the official code removes 16 random samples from the training split and
  uses the first half of them (`val_samples`, 8); mmval uses the first `val_samples` of the
  recipe's validation split, which also selects the model.
- theta_0: the first parameter tensor of the encoder of `hypergradient_modality` (the model's
  first modality unless set; audio in the CREMA-D and Kinetics-Sounds recipes, the official
  model's first encoder), since mmval's models order their parameters by data modality.
- other fusions [ours]: with a decomposable fusion other than `late`, CE is on that fusion's
  logits (older recipes and checkpoints trained LFM with `concat`).
- M > 2 [ours]: the official code has two modalities; z averages all M heads (the `late`
  fusion) and the alignment is the mean JS over all pairs of modalities.
- JS takes log_softmax where the official takes the log of the softmax (the same value unless a
  probability underflows to 0, where the official gives inf or NaN).
- train.freeze [ours]: H is over the parameters that train in the epoch (a frozen one has no
  gradient to differentiate); theta_0 frozen is refused, since g is its entries' mean.

DDP: every rank computes g on the same samples with the same weights, and alpha_1 is then taken
from rank 0 (`broadcast_object`), so all ranks train with the same weight whatever the kernels'
rounding; the loss is a batch mean, so the averaged gradients are the global batch's.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from mmval.distributed import broadcast_object
from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.models import ModelConfig, ModelOutput

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")

ALPHA_MIN, ALPHA_MAX = 0.05, 0.95
# the share of the first validation batch that earlier versions used instead of `val_samples`,
# with the default every old dump carries (those still load; another value is refused)
OLD_VAL_FRACTION = 0.25


class LFMConfig(MethodConfig):
    fusion: ClassVar[str] = "late"
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    # quick runs start from the cross-entropy: at the official 0.95 the loss is mostly the
    # alignment, near 0 while the untrained heads agree and growing as they learn, so the loss
    # of a two-epoch run need not fall
    quick: ClassVar[dict[str, Any]] = {"method": {"alpha_init": ALPHA_MIN}}
    name: Literal["lfm"] = "lfm"
    source: ClassVar[str] = "njustkmg/NeurIPS24-LFM@ad44fa09fee471c9267a7cba526b222c54d45493"
    alpha_init: float = Field(
        default=0.95,
        ge=ALPHA_MIN,
        le=ALPHA_MAX,
        description="initial alignment weight alpha_1; the cross-entropy gets 1 - alpha_1 "
        "(official cls_k = [0.05, 0.95])",
    )
    lr_alpha: float = Field(default=1e-4, ge=0, description="step size of alpha_1 (1e-4)")
    lr_alpha_halve_every: int = Field(
        default=20, ge=1, description="lr_alpha is halved every this many epochs (20)"
    )
    val_samples: int = Field(
        default=8,
        ge=1,
        description="validation samples (the first of the split) for alpha_1's step (official "
        "8, half of its 16 held-out samples)",
    )
    hypergradient_modality: str | None = Field(
        default=None,
        description="whose encoder's first parameter tensor gives alpha_1's step (official: "
        "audio's); unset, the model's first modality",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_val_fraction(cls, data: Any) -> Any:
        """Recipes and dumps written before `val_samples` carry `val_fraction: 0.25`; that is
        dropped, another value is refused with its replacement named."""
        if not isinstance(data, dict) or "val_fraction" not in data:
            return data
        rest = {key: value for key, value in data.items() if key != "val_fraction"}
        if data["val_fraction"] != OLD_VAL_FRACTION:
            raise ValueError(
                "val_fraction (a share of the first validation batch) is replaced by "
                "val_samples, a number of validation samples (the official 8)"
            )
        return rest

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        chosen = self.hypergradient_modality
        if chosen is None or modalities is None or chosen in modalities:
            return []
        return [
            (
                "method.hypergradient_modality",
                f"{chosen} is not one of the modalities ({', '.join(modalities)})",
            )
        ]


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
    params: list[torch.Tensor],
    first: torch.Tensor,
    cls_loss: torch.Tensor,
    align_loss: torch.Tensor,
    alpha: float,
) -> float:
    """The official step direction: the mean entry of H(L_total) grad L_cls over `first`, with
    L_total = (1 - alpha) L_cls + alpha L_align, H over `params` and grad L_cls constant."""
    total = (1 - alpha) * cls_loss + alpha * align_loss
    g_total = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    g_cls = torch.autograd.grad(cls_loss, params, retain_graph=True, allow_unused=True)
    # (H v)_first = d/d first of grad L_total . v for a constant v
    dot = sum(
        (gt * gc).sum()
        for gt, gc in zip(g_total, g_cls, strict=True)
        if gt is not None and gc is not None
    )
    (hvp,) = torch.autograd.grad(dot, first)
    return float(hvp.mean())


def held_out(ctx: TrainContext, count: int) -> Batch:
    """The first `count` samples of the validation split (fewer if it is smaller), one batch."""
    from mmval.data.dataset import Batch

    positions = np.arange(min(count, ctx.sizes["val"]))
    parts = list(ctx.batches("val", positions))
    return Batch(
        inputs={m: torch.cat([b.inputs[m] for b in parts]) for m in parts[0].inputs},
        label=torch.cat([b.label for b in parts]),
        index=torch.cat([b.index for b in parts]),
    )


def loss_parts(
    model: MultimodalModel, out: ModelOutput, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of the fused logits and the alignment of the unimodal heads."""
    assert out.unimodal_logits is not None
    cls = F.cross_entropy(out.logits, labels)
    return cls, alignment_loss([out.unimodal_logits[m] for m in model.modalities])


class LFM(Method):
    Config: ClassVar[type[MethodConfig]] = LFMConfig
    config: LFMConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.alpha = self.config.alpha_init  # alpha_1, the alignment weight

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        batch = held_out(ctx, self.config.val_samples)
        # the official mode: the fresh model's before epoch 0, the test pass's afterwards
        model.train(ctx.epoch == 0)
        cls, align = loss_parts(model, model(batch.inputs), batch.label)
        params = [p for p in model.parameters() if p.requires_grad]
        modality = self.config.hypergradient_modality or model.modalities[0]
        first = next(model.encoders[modality].parameters())
        if not first.requires_grad:
            raise UserError(
                f"lfm's weight step differentiates by the first parameter of encoders.{modality}, "
                f"which train.freeze freezes in epoch {ctx.epoch + 1}: do not freeze that "
                "encoder's first layer, or set method.hypergradient_modality to another modality."
            )
        grad = alpha_gradient(params, first, cls, align, self.alpha)
        model.train()
        lr = self.config.lr_alpha / 2 ** (ctx.epoch // self.config.lr_alpha_halve_every)
        self.alpha = broadcast_object(min(ALPHA_MAX, max(ALPHA_MIN, self.alpha - lr * grad)))

    def objective(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss, and its two parts for the epoch log (the official FusionLoss and
        AlignLoss)."""
        cls, align = loss_parts(model, out, batch.label)
        loss = 2 * ((1 - self.alpha) * cls + self.alpha * align)
        return loss, {"cls_loss": cls.item(), "align_loss": align.item()}

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        return {"alpha_align": self.alpha}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state["alpha"])
