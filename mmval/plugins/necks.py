"""The plug-ins' torch modules (their necks, and C3R's instrument attention), apart from the
plug-in files so that a recipe can be read without importing torch: each plug-in's file
(`mmval.plugins.c3r`, `mmval.plugins.imml`) names the paper and the official code these follow,
and imports its modules from here when it builds them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmval.distributed import gather_rows
from mmval.errors import UserError
from mmval.models.neck import Neck
from mmval.plugins.c3r import WIDTH, C3RTrace

if TYPE_CHECKING:
    from mmval.plugins.imml import IMMLConfig


class C3RNeck(Neck):
    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.names = list(dims)
        self.in_dims = dict(dims)
        self.mlps = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(d, 128),
                    nn.ELU(),
                    nn.Linear(128, 32),
                    nn.ELU(),
                    nn.Linear(32, 2 * WIDTH),
                )
                for m, d in dims.items()
            }
        )
        eye = torch.eye(WIDTH).repeat(len(dims), 1, 1)
        self.w_causal = nn.Parameter(eye.clone())
        self.w_other = nn.Parameter(eye.clone())
        self.out_dims = dict.fromkeys(self.names, WIDTH)

    def parts(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z_c, Z_n), each [B, M, 64]."""
        both = torch.stack([self.mlps[m](feats[m]) for m in self.names], dim=1)
        return both[..., :WIDTH], both[..., WIDTH:]

    def combine(self, causal: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Z = W_c Z_c + W_n Z_n, per modality: [B, M, 64]."""
        return torch.einsum("bmi,moi->bmo", causal, self.w_causal.to(causal.dtype)) + torch.einsum(
            "bmi,moi->bmo", other, self.w_other.to(other.dtype)
        )

    def split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: z[:, j] for j, m in enumerate(self.names)}

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        causal, other = self.parts(feats)
        z = self.combine(causal, other)
        if self.training:
            self.trace = C3RTrace(feats, causal, other, z)
        return self.split(z)


class InstrumentAttention(nn.Module):
    """The instrument V of Eq. 6: distance-weighted attention over the modality tokens."""

    def __init__(self, dims: dict[str, int], out_dim: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.width = max(dims.values())
        # tokens of different sizes are brought to one width first [ours]
        self.adapters = (
            nn.ModuleDict({m: nn.Linear(d, self.width) for m, d in dims.items()})
            if len(set(dims.values())) > 1
            else None
        )
        self.w_q = nn.Linear(self.width, self.width)
        self.w_k = nn.Linear(self.width, self.width)
        self.w_v = nn.Linear(self.width, self.width)
        self.out = nn.Linear(self.width, out_dim)

    def tokens(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, M, width]."""
        if self.adapters is None:
            return torch.stack([feats[m] for m in self.names], dim=1)
        return torch.stack([self.adapters[m](feats[m]) for m in self.names], dim=1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """alpha [B, M, M] for tokens x: softmax_j(q_i.k_j / sqrt(d) + log omega_ij)."""
        scores = self.w_q(x) @ self.w_k(x).transpose(1, 2) / math.sqrt(self.width)
        unit = F.normalize(x, dim=-1)
        distance = (unit[:, :, None, :] - unit[:, None, :, :]).pow(2).sum(-1)
        return torch.softmax(scores - distance, dim=-1)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.tokens(feats)
        attended = self.weights(x) @ self.w_v(x)
        return self.out(attended.mean(dim=1))


class IMMLNeck(Neck):
    def __init__(self, dims: dict[str, int], config: IMMLConfig) -> None:
        super().__init__()
        self.names = list(dims)
        if config.predominant is not None and config.predominant not in dims:
            raise UserError(
                f"plugins: imml's predominant {config.predominant!r} is not a modality of the "
                f"model ({', '.join(self.names)})."
            )
        self.adjustment = config.adjustment
        self.width = width = config.width
        self.projectors = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width))
                for m, d in dims.items()
            }
        )
        self.query = nn.Linear(width, width)
        self.slices = {}  # modality -> its columns in a bank row
        start = 0
        for m, d in dims.items():
            self.slices[m] = slice(start, start + d)
            start += d
        if config.adjustment == "beta":
            self.key = nn.ModuleDict({"all": nn.Linear(start, width)})
            self.value = nn.ModuleDict({"all": nn.Linear(start, width)})
        else:  # the treatment's own slice; one pair per modality, as p may change after warm-up
            self.key = nn.ModuleDict({m: nn.Linear(d, width) for m, d in dims.items()})
            self.value = nn.ModuleDict({m: nn.Linear(d, width) for m, d in dims.items()})
        self.register_buffer("bank", torch.zeros(config.bank_size, start))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        first = 0 if config.predominant is None else self.names.index(config.predominant)
        self.register_buffer("predominant", torch.tensor(first, dtype=torch.long))
        self.out_dims = {m: 2 * width for m in self.names}

    @property
    def predominant_name(self) -> str:
        return self.names[int(self.predominant)]

    def set_predominant(self, name: str) -> None:
        self.predominant.fill_(self.names.index(name))

    def project(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """m_k = D_k(h_k), the discriminative knowledge of each modality."""
        return {m: self.projectors[m](feats[m]) for m in self.names}

    def dictionary(self) -> tuple[torch.Tensor, nn.Linear, nn.Linear]:
        """The filled rows of the bank the adjustment ranges over, and their key / value maps."""
        memory = self.bank[: int(self.bank_count)]
        if self.training:  # the batch is enqueued before backward reads the keys' input
            memory = memory.clone()
        if self.adjustment == "beta":
            return memory, self.key["all"], self.value["all"]
        p = self.predominant_name
        return memory[:, self.slices[p]], self.key[p], self.value[p]

    def context(self, mediator: torch.Tensor) -> torch.Tensor:
        """Attention of W_q m_p over the dictionary; zeros while the bank is empty."""
        if int(self.bank_count) == 0:
            return mediator.new_zeros(mediator.shape[0], self.width)
        memory, key, value = self.dictionary()
        # q k_j = (q W_k) b_j + q b_k and sum_j a_j (W_v b_j + b_v) = W_v (sum_j a_j b_j) + b_v:
        # the keys and values of the whole bank are never formed
        q = self.query(mediator) / math.sqrt(self.width)
        scores = (q @ key.weight) @ memory.T + (q @ key.bias)[:, None]
        return value(torch.softmax(scores, dim=-1) @ memory)

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

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        proj = self.project(feats)
        p = self.predominant_name
        ctx = self.context(proj[p])
        out = {m: torch.cat([proj[m], ctx if m == p else torch.zeros_like(ctx)], 1) for m in proj}
        if self.training:
            self.trace = proj
            self.enqueue(feats)
        return out
