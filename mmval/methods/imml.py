"""IMML: interventional imbalanced multi-modal learning by a beta-generalised front-door.

Paper: Li, Song, Zheng, Li, Sun, Xiong, "Interventional Imbalanced Multi-Modal Representation
Learning via beta-Generalization Front-Door Criterion", arXiv 2406.11490 (v2, 2025). No official
code is public. Only the abstract (v1 and v2) and third-party summaries could be read, not the
method section: the components are the paper's (a modality discriminative knowledge exploration
network, per-modality discriminative features and heads aligned by a contrastive loss; a
beta-generalised front-door adjustment of the predominant modality's effect on Y that also
ranges over the auxiliary modality; loss weights gamma_1, gamma_2; plug-in on a fusion + target
head such as QMF's), every formula below is [ours]. Spec: docs/methods.md#imml.

What it changes: the head and the loss. The `imml` fusion (mmval/models/fusions/imml.py) holds
the projectors m_k = D_k(h_k) (R^256), the front-door context attention of W_q m_p over a FIFO
bank of past detached features, the head W [m_1; ...; m_M; ctx] + b, and the per-modality heads
c_k. The loss is
  CE(z, y) + gamma_1 L_con + gamma_2 L_uni,
  L_uni = sum_k CE(c_k(m_k), y),
  L_con = mean over auxiliary a of InfoNCE(m_p, m_a): with u = m_p / |m_p| and w = m_a / |m_a|,
          S = u w^T / tau, (CE(S, I) + CE(S^T, I)) / 2 (positives: the same sample; negatives:
          the rest of the batch; tau = 0.07).
The predominant modality p is `model.fusion.predominant` (text on MVSA-Single and HFM, the
paper's Fig. 1b), or, left unset, chosen at the end of warm-up epoch `warmup_epochs` as the
modality whose head c_k has the highest validation accuracy (the first in order on ties; the
first modality until then). The choice is stored in the fusion, so checkpoints keep it; the epoch
log's `predominant` is its index in the model's modalities.

Defaults [ours]: gamma_1 = gamma_2 = 0.1 (the paper shows a sensitivity study, Fig. 4, whose
values could not be read; grid {0.01, 0.05, 0.1, 0.5, 1}), tau = 0.07, one warm-up epoch, a
4096-row bank (`model.fusion.bank_size`). The plug-in target in the paper is QMF; here the base
is the concat head inside the `imml` fusion (fusions do not stack), so QMF's confidence weighting
and ranking loss are absent.

M > 2: one predominant modality, every other one auxiliary; L_con pairs p with each auxiliary
modality (averaged, so gamma_1 does not grow with M), L_uni sums over all modalities.

DDP: the InfoNCE negatives are the whole global batch: each rank gathers every rank's
normalised projections with their gradients (`gather_rows_with_grad`) and scores its own
samples against all of them, so the averaged gradient is the one-process one. The bank receives
the global batch's rows on every rank (mmval/models/fusions/imml.py). The validation accuracies
that pick the predominant modality are counted on each rank's share of the split and summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mmval.data.dataset import Batch
from mmval.distributed import all_reduce, gather_rows_with_grad
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.models import ModelConfig, ModelOutput, MultimodalModel
from mmval.models.fusions.imml import IMMLFusion, IMMLFusionConfig


class IMMLConfig(MethodConfig):
    fusion: ClassVar[str] = "imml"
    fusions: ClassVar[tuple[str, ...] | None] = ("imml",)
    min_modalities: ClassVar[int] = 2
    name: Literal["imml"] = "imml"
    quick: ClassVar[dict[str, Any]] = {"model": {"fusion": {"name": "imml", "bank_size": 64}}}
    gamma1: float = Field(default=0.1, ge=0, description="weight of the contrastive loss [ours]")
    gamma2: float = Field(default=0.1, ge=0, description="weight of the unimodal heads [ours]")
    temperature: float = Field(default=0.07, gt=0, description="InfoNCE temperature tau [ours]")
    warmup_epochs: int = Field(
        default=1,
        ge=1,
        description="with model.fusion.predominant unset: epochs before the predominant "
        "modality is chosen by unimodal validation accuracy",
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        chosen = model.fusion.predominant if isinstance(model.fusion, IMMLFusionConfig) else None
        if chosen is not None and modalities is not None and chosen not in modalities:
            return [
                (
                    "model.fusion.predominant",
                    f"{chosen!r} is not one of data.modalities ({', '.join(modalities)})",
                )
            ]
        return []


def info_nce(anchor: torch.Tensor, other: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views [B, D] of the same samples (cosine similarities);
    under DDP this rank's samples against the whole global batch."""
    u, w = F.normalize(anchor.float(), dim=1), F.normalize(other.float(), dim=1)
    all_u, offset = gather_rows_with_grad(u)
    all_w, _ = gather_rows_with_grad(w)
    targets = torch.arange(offset, offset + u.shape[0], device=u.device)
    sims = u @ all_w.T / temperature
    sims_t = (all_u @ w.T).T / temperature  # in one process: sims.T
    return (F.cross_entropy(sims, targets) + F.cross_entropy(sims_t, targets)) / 2


@dataclass
class IMMLOutput(ModelOutput):
    projections: dict[str, torch.Tensor]  # m_k = D_k(h_k)


class IMML(Method):
    Config: ClassVar[type[MethodConfig]] = IMMLConfig
    config: IMMLConfig

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> IMMLOutput:
        fusion = model.fusion
        assert isinstance(fusion, IMMLFusion)
        features = model.encode(batch.inputs)
        proj = fusion.project(features)
        logits = fusion.fuse_projected(proj, features)
        return IMMLOutput(logits, features, fusion.heads_of(proj), proj)

    def objective(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss and the epoch-log figures (the two auxiliary losses)."""
        fusion = model.fusion
        assert isinstance(out, IMMLOutput) and isinstance(fusion, IMMLFusion)
        assert out.unimodal_logits is not None
        labels, predominant = batch.label, fusion.predominant_name
        auxiliary = [m for m in model.modalities if m != predominant]
        anchor = out.projections[predominant]
        loss_con = torch.stack(
            [info_nce(anchor, out.projections[a], self.config.temperature) for a in auxiliary]
        ).mean()
        loss_uni = torch.stack(
            [F.cross_entropy(z, labels) for z in out.unimodal_logits.values()]
        ).sum()
        loss = (
            F.cross_entropy(out.logits, labels)
            + self.config.gamma1 * loss_con
            + self.config.gamma2 * loss_uni
        )
        con, uni = torch.stack([loss_con.detach().float(), loss_uni.detach().float()]).tolist()
        return loss, {"loss_con": con, "loss_uni": uni}

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        fusion = model.fusion
        assert isinstance(fusion, IMMLFusion)
        if fusion.auto_predominant and ctx.epoch == self.config.warmup_epochs - 1:
            accuracy = unimodal_accuracy(model, fusion, ctx)
            fusion.set_predominant(max(fusion.names, key=lambda m: accuracy[m]))
        return {"predominant": float(fusion.predominant)}


@torch.no_grad()
def unimodal_accuracy(
    model: MultimodalModel, fusion: IMMLFusion, ctx: TrainContext
) -> dict[str, float]:
    """Validation accuracy of each head c_k, in evaluation mode (the bank is left alone)."""
    was_training = model.training
    model.eval()
    correct = dict.fromkeys(fusion.names, 0)
    seen = 0
    for batch in ctx.rank_batches("val"):
        logits = fusion.unimodal_logits(model.encode(batch.inputs))
        for m, z in logits.items():
            correct[m] += int((z.argmax(1) == batch.label).sum())
        seen += len(batch)
    model.train(was_training)
    counts = all_reduce(torch.tensor([*correct.values(), seen]))  # DDP: every rank's share
    *hits, total = counts.tolist()
    return {m: c / max(total, 1) for m, c in zip(correct, hits, strict=True)}
