"""IMML as a plug-in: discriminative knowledge exploration and the beta-generalised front-door
adjustment, between any model's encoders and its fusion / target head.

Paper: Li, Song, Zheng, Li, Sun, Xiong, "Interventional Imbalanced Multi-Modal Representation
Learning via beta-Generalization Front-Door Criterion", arXiv 2406.11490 (v2, 2025). What could
be read is the abstract and third-party summaries; the method section, the definition of beta
and the loss weights could not, and no code is public. From the paper: IMML is "a
plug-and-play component" placed between the encoders and "the fusion module and target mapping
module of any multi-modal model" (Fig. 3), reported on QMF (QMF + IMML against QMF and
QMF + PMR, Fig. 1d); its parts are a modality discriminative knowledge exploration network
(per-modality discriminative features and heads, aligned by a contrastive loss) and a
beta-generalised front-door adjustment of the predominant modality's effect on Y (Defs. 3.3-3.5,
Thm. 3.6), with loss weights gamma_1 and gamma_2 (sensitivity study, Fig. 4). Every formula below
is therefore [ours], in the usual deep front-door form (NWGM: the outer sum over the mediator
collapses to the deterministic m = D_p(h_p); the inner expectation becomes an attention over a
dictionary of past samples).

The neck (`IMMLNeck`), part of the model:
- m_k = D_k(h_k), a two-layer MLP per modality to R^256 [ours] (the discriminative knowledge;
  the mediator M of the front door is m_p of the predominant modality p);
- ctx = softmax(W_q m_p (W_k B)^T / sqrt(256)) W_v B over a dictionary B of past training
  samples: a FIFO bank of the detached neck inputs [h_1; ...; h_M] (4096 rows [ours]), a buffer,
  so checkpoints keep it; written only in training mode (frozen in evaluation and valuation),
  after the batch's own context is computed (no sample attends to itself); empty, ctx = 0;
- the fusion reads, per modality, [m_k; ctx] for k = p and [m_k; 0] otherwise (width 512): for
  a concat head that is [m_p; ctx; m_a] up to a permutation of its columns and zero blocks, the
  paper's input to the fusion / target mapping; for a per-modality head (QMF, late fusion) the
  predominant modality's head reads its context. Zeroing a modality in valuation zeroes its
  context with it.

The adjustment (`adjustment`), the point of the beta-generalisation in our reading [ours]:
- `front_door`: the textbook criterion (the paper's Thm. 3.2),
  P(Y | do(x_p)) = sum_m P(m | x_p) sum_x' P(x') P(Y | m, x'): the alpha path, the back-door
  M <- X_p <- U -> Y, is blocked by averaging over past predominant inputs x'; the dictionary
  is B_p, the predominant modality's slice of the bank;
- `beta` (default): the back-door from M to Y also runs through the auxiliary modality
  (the beta path, M <- X_p <-> X_a -> Y, which the plain criterion leaves open when the
  modalities share a confounder), so the adjustment ranges over pairs,
  P(Y | do(x_p)) = sum_m P(m | x_p) sum_{x', a'} P(x', a') P(Y | m, x', a'): the dictionary is
  the whole bank [h_1; ...; h_M].
The switch lets the difference be measured (README); which paths the paper's Fig. 2b draws
could not be checked.

The loss added to the base method's (`IMML.objective`):
  gamma_1 L_con + gamma_2 L_uni,
  L_uni = sum_k CE(c_k(m_k), y) with heads c_k of the plug-in (not part of the prediction),
  L_con = mean over auxiliary a of InfoNCE(m_p, m_a): with u = m_p / |m_p|, w = m_a / |m_a|,
          S = u w^T / tau, (CE(S, I) + CE(S^T, I)) / 2 (positives: the same sample; negatives:
          the rest of the batch; tau 0.07 [ours]).
gamma_1 = gamma_2 = 0.1 [ours] (the values of Fig. 4 could not be read; its grid is in
recipes/sweep-imml-gamma-uci-mfeat.yaml).

The predominant modality p is `predominant` (text on MVSA-Single and HFM, the paper's Fig. 1b),
or, left unset, chosen at the end of warm-up epoch `warmup_epochs` as the modality whose head
c_k has the highest validation accuracy (the first in order on ties; the first modality until
then) [ours: the paper names the predominant modality per data set]. The choice is a buffer of
the neck, so checkpoints keep it; the epoch log's `imml_predominant` is its index.

M > 2: one predominant modality, every other one auxiliary; L_con pairs p with each auxiliary
modality (averaged, so gamma_1 does not grow with M), L_uni sums over all modalities.

DDP: the InfoNCE negatives are the whole global batch (each rank gathers every rank's normalised
projections with their gradients); the bank receives the global batch's rows on every rank; the
validation accuracies that pick p are counted on each rank's share and summed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.distributed import all_reduce, gather_rows_with_grad
from mmval.lazy import lazy_module, no_grad
from mmval.models import ModelOutput
from mmval.plugins.base import EpochContext, Plugin, PluginConfig

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
    from mmval.models.neck import Neck
    from mmval.plugins.necks import IMMLNeck
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")
    nn = lazy_module("torch.nn")

Adjustment = Literal["beta", "front_door"]


class IMMLConfig(PluginConfig):
    name: Literal["imml"] = "imml"
    source: ClassVar[str] = "no public code; the method section unreadable, every formula [ours]"
    min_modalities: ClassVar[int] = 2
    quick: ClassVar[dict[str, Any]] = {"bank_size": 64}
    gamma1: float = Field(default=0.1, ge=0, description="weight of the contrastive loss [ours]")
    gamma2: float = Field(default=0.1, ge=0, description="weight of the unimodal heads [ours]")
    temperature: float = Field(default=0.07, gt=0, description="InfoNCE temperature tau [ours]")
    adjustment: Adjustment = Field(
        default="beta",
        description="beta: the dictionary holds every modality (pairs x', a'; our reading of the "
        "beta-generalisation); front_door: the predominant modality's only (the textbook "
        "criterion)",
    )
    predominant: str | None = Field(
        default=None,
        description="the predominant modality (the front-door treatment); unset: the one whose "
        "unimodal head has the highest val accuracy after warmup_epochs",
    )
    warmup_epochs: int = Field(
        default=1, ge=1, description="with predominant unset: epochs before it is chosen"
    )
    bank_size: int = Field(default=4096, ge=1, description="rows of the FIFO dictionary [ours]")
    width: int = Field(default=256, ge=1, description="size of the projections m_k [ours]")

    def build_neck(self, dims: dict[str, int], num_classes: int) -> Neck:
        from mmval.plugins.necks import IMMLNeck

        return IMMLNeck(dims, self)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        """Chosen at the end of 0-based epoch warmup_epochs - 1: too late for a run that ends
        there (the first modality would stay predominant throughout)."""
        if self.predominant is not None or self.warmup_epochs < epochs:
            return None
        return (
            "warmup_epochs",
            f"the predominant modality would be chosen after epoch {self.warmup_epochs} of a "
            f"{epochs}-epoch run (train.epochs): the run would train with the first modality "
            "as predominant throughout; lower it, raise train.epochs or set predominant",
        )

    def problems(self, modalities: list[str] | None) -> list[tuple[str, str]]:
        if self.predominant is not None and modalities and self.predominant not in modalities:
            listed = ", ".join(modalities)
            return [("predominant", f"{self.predominant!r} is not one of ({listed})")]
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


class IMML(Plugin):
    Config: ClassVar[type[PluginConfig]] = IMMLConfig
    config: IMMLConfig

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        from mmval.plugins.necks import IMMLNeck

        neck = self.neck(model)
        assert isinstance(neck, IMMLNeck)
        self.heads = nn.ModuleDict({m: nn.Linear(neck.width, self.num_classes) for m in neck.names})
        return nn.ModuleDict({"heads": self.heads})

    def objective(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from mmval.plugins.necks import IMMLNeck

        neck = self.neck(model)
        assert isinstance(neck, IMMLNeck) and neck.trace is not None
        proj: dict[str, torch.Tensor] = neck.trace
        p = neck.predominant_name
        loss_con = torch.stack(
            [info_nce(proj[p], proj[a], self.config.temperature) for a in neck.names if a != p]
        ).mean()
        loss_uni = torch.stack(
            [F.cross_entropy(self.heads[m](proj[m]), batch.label) for m in neck.names]
        ).sum()
        loss = self.config.gamma1 * loss_con + self.config.gamma2 * loss_uni
        con, uni = torch.stack([loss_con.detach().float(), loss_uni.detach().float()]).tolist()
        return loss, {"loss_con": con, "loss_uni": uni}

    def on_epoch_end(self, model: MultimodalModel, ctx: EpochContext) -> dict[str, float]:
        from mmval.plugins.necks import IMMLNeck

        neck = self.neck(model)
        assert isinstance(neck, IMMLNeck)
        if self.config.predominant is None and ctx.epoch == self.config.warmup_epochs - 1:
            accuracy = self.unimodal_accuracy(model, neck, ctx)
            neck.set_predominant(max(neck.names, key=lambda m: accuracy[m]))
        return {"predominant": float(neck.predominant)}

    @no_grad
    def unimodal_accuracy(
        self, model: MultimodalModel, neck: IMMLNeck, ctx: EpochContext
    ) -> dict[str, float]:
        """Validation accuracy of each head c_k, in evaluation mode (the bank is left alone)."""
        was_training = model.training
        model.eval()
        correct = dict.fromkeys(neck.names, 0)
        seen = 0
        for batch in ctx.rank_batches("val"):
            proj = neck.project(model.encode(batch.inputs, necks=self.position))
            for m, z in proj.items():
                correct[m] += int((self.heads[m](z).argmax(1) == batch.label).sum())
            seen += len(batch)
        model.train(was_training)
        counts = all_reduce(torch.tensor([*correct.values(), seen]))  # DDP: every rank's share
        *hits, total = counts.tolist()
        return {m: c / max(total, 1) for m, c in zip(correct, hits, strict=True)}
