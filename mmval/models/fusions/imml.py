"""The IMML head: discriminative projections, front-door context attention, fusion/target head.

IMML (Li, Song, Zheng, Li, Sun, Xiong, arXiv 2406.11490) estimates the effect of the predominant
modality X_p on Y through its discriminative knowledge M (the mediator) by a front-door
adjustment that also ranges over the auxiliary modality:
P(Y | do(x_p)) = sum_m P(m | x_p) sum_{x', a'} P(x', a') P(Y | m, x', a').
No code is public and the method section could not be read (only the abstract and third-party
summaries), so the realisation is ours, in the usual deep front-door form (NWGM: the outer sum
collapses to the deterministic m = D_p(h_p), the inner expectation over (x', a') becomes an
attention over a dictionary of past samples queried by m):
- m_k = D_k(h_k), a two-layer MLP per modality to R^256;
- ctx = softmax(W_q m_p (W_k B)^T / sqrt(256)) W_v B over the bank B, a FIFO queue of the
  detached, concatenated encoder features [h_1; ...; h_M] of past training batches (4096 rows);
  it is a registered buffer, so checkpoints keep it, and it is only written in training mode
  (frozen at evaluation and valuation); the current batch is enqueued after its own context is
  computed, so a sample never attends to itself, and an empty bank gives ctx = 0;
- logits = W [m_1; ...; m_M; ctx] + b (the concat "F&T" head of the base model). The head reads
  the modalities in their fixed order rather than [m_p; ctx; m_a]: the same head up to a
  permutation of its columns, which lets the predominant modality be chosen after a warm-up
  without reshuffling trained weights;
- per-modality heads c_k(m_k) (the L_uni of the `imml` method) are the fusion's unimodal logits,
  so the engine logs each modality's accuracy.
M > 2: one predominant modality (the query), every other one auxiliary (its m_k enters the head
and the bank). The predominant modality is fixed by `model.fusion.predominant`, or, left unset,
chosen by the `imml` method after its warm-up (the modality whose head c_k has the higher
validation accuracy); it is a buffer too, so a checkpoint is evaluated with the one it trained.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mmval.distributed import gather_rows
from mmval.errors import UserError
from mmval.models.fusions.base import FusionConfig

PROJECTION_DIM = 256


class IMMLFusion(nn.Module):
    def __init__(
        self,
        dims: dict[str, int],
        num_classes: int,
        predominant: str | None,
        bank_size: int,
        width: int = PROJECTION_DIM,
    ) -> None:
        super().__init__()
        self.names = list(dims)
        if predominant is not None and predominant not in dims:
            raise UserError(
                f"model.fusion.predominant: {predominant!r} is not a modality of the model "
                f"({', '.join(self.names)})."
            )
        self.auto_predominant = predominant is None
        self.width = width
        self.projectors = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width))
                for m, d in dims.items()
            }
        )
        self.heads = nn.ModuleDict({m: nn.Linear(width, num_classes) for m in self.names})
        bank_dim = sum(dims.values())
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(bank_dim, width)
        self.value = nn.Linear(bank_dim, width)
        self.classifier = nn.Linear(width * (len(self.names) + 1), num_classes)
        self.register_buffer("bank", torch.zeros(bank_size, bank_dim))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        first = 0 if predominant is None else self.names.index(predominant)
        self.register_buffer("predominant", torch.tensor(first, dtype=torch.long))

    @property
    def predominant_name(self) -> str:
        return self.names[int(self.predominant)]

    def set_predominant(self, name: str) -> None:
        self.predominant.fill_(self.names.index(name))

    def project(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """m_k = D_k(h_k), the discriminative knowledge of each modality."""
        return {m: self.projectors[m](feats[m]) for m in self.names}

    def heads_of(self, proj: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](proj[m]) for m in self.names}

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.heads_of(self.project(feats))

    def context(self, query: torch.Tensor) -> torch.Tensor:
        """Attention of W_q m_p over the filled rows of the bank; zeros while it is empty."""
        filled = int(self.bank_count)
        if filled == 0:
            return query.new_zeros(query.shape[0], self.width)
        memory = self.bank[:filled]
        if self.training:  # the batch is enqueued before backward reads the keys' input
            memory = memory.clone()
        # q k_j = (q W_k) b_j + q b_k and sum_j a_j (W_v b_j + b_v) = W_v (sum_j a_j b_j) + b_v:
        # the keys and values of the whole bank are never formed (N x D x width multiplies less)
        q = self.query(query) / math.sqrt(self.width)
        scores = (q @ self.key.weight) @ memory.T + (q @ self.key.bias)[:, None]
        return self.value(torch.softmax(scores, dim=-1) @ memory)

    def joint(self, proj: dict[str, torch.Tensor]) -> torch.Tensor:
        """[m_1; ...; m_M; ctx], what the fusion/target head classifies."""
        ctx = self.context(proj[self.predominant_name])
        return torch.cat([*(proj[m] for m in self.names), ctx], dim=1)

    @torch.no_grad()
    def enqueue(self, feats: dict[str, torch.Tensor]) -> None:
        """Write the batch's [h_1; ...; h_M] into the FIFO bank (oldest rows overwritten); under
        DDP the global batch's rows, in rank order, so every rank keeps the same bank."""
        rows = torch.cat([feats[m].detach() for m in self.names], dim=1).to(self.bank.dtype)
        rows = gather_rows(rows)
        size = self.bank.shape[0]
        if rows.shape[0] >= size:
            self.bank.copy_(rows[-size:])
            self.bank_ptr.zero_()
            self.bank_count.fill_(size)
            return
        slots = (self.bank_ptr + torch.arange(rows.shape[0], device=rows.device)) % size
        self.bank[slots] = rows
        self.bank_ptr.copy_((self.bank_ptr + rows.shape[0]) % size)
        self.bank_count.clamp_(max=size - rows.shape[0]).add_(rows.shape[0])

    def fuse_projected(
        self, proj: dict[str, torch.Tensor], feats: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Logits from precomputed projections; in training mode the batch then joins the bank."""
        logits = self.classifier(self.joint(proj))
        if self.training:
            self.enqueue(feats)
        return logits

    def representation(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.joint(self.project(feats))

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fuse_projected(self.project(feats), feats)


class IMMLFusionConfig(FusionConfig):
    name: Literal["imml"] = "imml"
    decomposable: ClassVar[bool] = True
    flat_fields: ClassVar[dict[str, str]] = {
        "fusion_predominant": "predominant",
        "fusion_bank_size": "bank_size",
    }
    predominant: str | None = Field(
        default=None,
        description="imml fusion: the predominant modality (the front-door query); unset, the "
        "imml method picks the one with the higher unimodal val accuracy after its warm-up",
    )
    bank_size: int = Field(
        default=4096, ge=1, description="imml fusion: rows of the FIFO feature bank [ours]"
    )

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return IMMLFusion(dims, num_classes, self.predominant, self.bank_size)
