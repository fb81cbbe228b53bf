"""Shared head (MLA, ReconBoost): one head applied to every modality, fixed or entropy weights."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mmval.errors import UserError
from mmval.models.fusions.base import FusionConfig
from mmval.settings import ADDED_LATER

InferenceName = Literal["dynamic", "dynamic_batch", "fixed"]


class SharedFusion(nn.Module):
    """MLA (Zhang et al., CVPR 2024): one linear head H shared by all modalities, z_m = H(h_m),
    so every encoder must give features of the same size. Prediction z = sum_m lambda_m z_m with
    - `fixed`: fixed lambda (official `--av_alpha`; 1/M by default);
    - `dynamic`: per-sample weights lambda_m = softmax_m(-entropy(softmax(z_m))), the official
      exp(max_k e_k - e_m) / sum_j exp(max_k e_k - e_j) computed per sample, as
      BalanceBenchmark's `MLA_trainer.py` does;
    - `dynamic_batch`: the official weights as released (`--dynamic`; main.py
      `calculate_entropy` and `calculate_gating_weights(3)`, Cecile-hi/Multimodal-Learning-with-
      Alternating-Unimodal-Adaptation at ab6c184579f9ff390e9c9b8216c9900c2a43545b): one weight
      per modality for the whole batch, from e_m = -sum_{i,c} p_ic log p_ic where p is the
      softmax of the batch's logits [B, C] over the batch axis (`F.softmax(output, dim=0)`),
      not the mean of the per-sample weights. A prediction then depends on the other samples of
      its evaluation batch (`train.eval_batch_size`; official: the training batch size, in test
      order), and under DDP on each rank's share; in valuation the pooled weights mix the
      evaluated coalitions, so `dynamic` is the one to value.

    H is one Linear (MLA), or with `hidden` Linear(d, hidden)-ReLU-Linear(hidden, C), the head
    ReconBoost's official code shares between its modalities (huacong/ReconBoost, commit
    14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932, `models/dynamic_net.py` `Head`: hidden 256)."""

    def __init__(
        self,
        dims: dict[str, int],
        num_classes: int,
        weights: dict[str, float] | None,
        inference: InferenceName,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.names = list(dims)
        if len(set(dims.values())) != 1:
            sizes = ", ".join(f"{m} {d}" for m, d in dims.items())
            raise UserError(
                f"model.fusion: shared fusion applies one head to every modality, so all "
                f"encoders need the same out_dim; they give {sizes} (set model.encoder.out_dim "
                "or the out_dim of each model.encoders entry)."
            )
        if weights is not None and (inference != "fixed" or set(weights) != set(self.names)):
            raise UserError(
                "model.fusion.weights: give one weight per modality "
                f"({', '.join(self.names)}), with model.fusion.inference: fixed."
            )
        self.inference = inference
        fixed = weights or dict.fromkeys(self.names, 1 / len(self.names))
        self.weights = [fixed[m] for m in self.names]
        width = dims[self.names[0]]
        self.fc = (
            nn.Linear(width, num_classes)
            if hidden is None
            else nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        )

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.fc(feats[m]) for m in self.names}

    def lambdas(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fusion weights [M, B]."""
        z = torch.stack([logits[m] for m in self.names])
        if self.inference == "fixed":
            weights = torch.tensor(self.weights, dtype=z.dtype, device=z.device)
            return weights[:, None].expand(z.shape[:2])
        if self.inference == "dynamic":
            p, logp = z.softmax(-1), z.log_softmax(-1)
            return torch.softmax((p * logp).sum(-1), dim=0)  # softmax of minus the entropy
        # official: softmax over the batch axis, entropy summed over samples and classes
        p, logp = z.softmax(1), z.log_softmax(1)
        return torch.softmax((p * logp).sum((1, 2)), dim=0)[:, None].expand(z.shape[:2])

    def combine(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        z = torch.stack([logits[m] for m in self.names])
        return (self.lambdas(logits)[..., None] * z).sum(0)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.combine(self.unimodal_logits(feats))


class SharedFusionConfig(FusionConfig):
    name: Literal["shared"] = "shared"
    source: ClassVar[str] = (
        "Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation@"
        "ab6c184579f9ff390e9c9b8216c9900c2a43545b; "
        "huacong/ReconBoost@14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932"
    )
    decomposable: ClassVar[bool] = True
    flat_fields: ClassVar[dict[str, str]] = {
        "fusion_inference": "inference",
        "fusion_weights": "weights",
    }
    inference: InferenceName = Field(
        default="dynamic",
        description="shared fusion (MLA): per-sample entropy weights (dynamic), the official "
        "weights pooled over each evaluation batch (dynamic_batch), or fixed weights",
    )
    weights: dict[str, float] | None = Field(
        default=None,
        description="shared fusion with inference fixed: weight by modality (default 1/M; MLA "
        "official 0.5/0.5, three modalities a 0.35, v 0.25, t 0.4)",
    )
    hidden: Annotated[int | None, ADDED_LATER] = Field(
        default=None,
        ge=1,
        description="shared fusion: one Linear head (none; MLA), or Linear(d, hidden)-ReLU-"
        "Linear(hidden, C) (ReconBoost's official head: 256)",
    )

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return SharedFusion(dims, num_classes, self.weights, self.inference, self.hidden)
