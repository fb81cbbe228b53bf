"""OPM: on-the-fly prediction modulation (drop the dominant modality's features in training).

Paper: Wei, Hu, Wang, Peng, Hu, "On-the-fly Modulation for Balanced Multimodal Learning",
TPAMI 2024 (the companion of OGM-GE). No official OPM code was found; follows BalanceBenchmark
(GeWu-Lab/BalanceBenchmark, `balancemm/trainer/OPM_trainer.py`: `Modality_drop`,
`OPMTrainer.training_step`; defaults from `configs/trainer_config.yaml`); spec:
docs/methods.md#opm.

What it changes: the training forward. Per batch, inside the modulation window (0-based,
inclusive):
- scores s_m = sum_i softmax(z_m^i)[y_i] from the undropped per-modality logits (detached);
- rho_m = tanh(relu(s_m / (sum_{k != m} s_k + 1e-5) - 1)), drop probability
  q_m = clip(q_base (1 + alpha rho_m), 0, 1) if rho_m > 0 else 0;
- with probability p_exe the batch is modulated: each sample keeps h_m with probability 1 - q_m,
  and every feature is divided by 1 - theta + 1e-5, theta = sum_m d_m q_m / sum_m d_m (d_m the
  feature size); otherwise the features are left as they are;
- the fused logits of those features go into plain CE. Evaluation uses the undropped model.

M > 2: BalanceBenchmark's form (s_m against the sum of all other scores) is already M-way and
is used for every M; at M = 2 it is s_m / s_other. At most one modality can have
s_m > sum_{k != m} s_k, so at most one modality is ever dropped and no sample loses all of
them; BalanceBenchmark's removal of such samples therefore never acts and is left out.

Deviations: outside the window BalanceBenchmark has no loss at all (a bug); here it is plain CE.
Needs per-modality logits for the scores, so the fusion must be decomposable.

DDP: the scores s_m are summed over the ranks (`all_reduce`, before the batch's draw, so every
rank takes part whether or not the batch is modulated), giving every rank the global batch's
q_m; whether a batch is modulated is drawn from the global generator, in lockstep on every rank,
so the global batch is modulated as a whole, as in one process. The per-sample keep draws come
from the same lockstep stream on each rank's own samples, so they differ from a one-process
run's draws (same distribution).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from mmval.data.dataset import Batch
from mmval.distributed import all_reduce
from mmval.methods.base import Method, MethodConfig, TrainContext, window_problems
from mmval.models import ModelConfig, ModelOutput, MultimodalModel


class OPMConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["opm"] = "opm"
    alpha: float = Field(default=0.5, ge=0, description="drop-probability gain (BalanceMM 0.5)")
    q_base: float = Field(default=0.4, ge=0, le=1, description="base drop probability (0.4)")
    p_exe: float = Field(
        default=0.7, ge=0, le=1, description="probability that a batch is modulated (0.7)"
    )
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(default=80, ge=0, description="last modulated epoch (80)")

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)


def drop_probabilities(scores: torch.Tensor, q_base: float, alpha: float) -> torch.Tensor:
    """q_m from the batch scores s [M]."""
    others = scores.sum() - scores
    rho = torch.tanh(torch.relu(scores / (others + 1e-5) - 1))
    q = (q_base * (1 + alpha * rho)).clamp(0.0, 1.0)
    return torch.where(rho > 0, q, torch.zeros_like(q))


def drop_features(
    features: dict[str, torch.Tensor], q: torch.Tensor, keep: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """h_m * keep_m / (1 - theta + 1e-5), keep_m [B] in {0, 1}, theta the size-weighted mean q."""
    dims = torch.tensor([h.shape[1] for h in features.values()], dtype=q.dtype, device=q.device)
    theta = (dims * q).sum() / dims.sum()
    scale = 1 / (1 - theta + 1e-5)
    return {m: h * keep[m][:, None].to(h.dtype) * scale.to(h.dtype) for m, h in features.items()}


class OPM(Method):
    Config: ClassVar[type[MethodConfig]] = OPMConfig
    config: OPMConfig

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        features = model.encode(batch.inputs)
        unimodal = model.fusion.unimodal_logits(features)
        cfg = self.config
        if not cfg.modulation_starts <= ctx.epoch <= cfg.modulation_ends:
            return ModelOutput(model.fuse(features), features, unimodal)
        with torch.no_grad():
            scores = torch.stack(
                [
                    unimodal[m].float().softmax(1).gather(1, batch.label[:, None]).sum()
                    for m in model.modalities
                ]
            )
            scores = all_reduce(scores)  # DDP: the global batch's
        if float(torch.rand(())) >= cfg.p_exe:  # the batch is modulated with probability p_exe
            return ModelOutput(model.fuse(features), features, unimodal)
        with torch.no_grad():
            q = drop_probabilities(scores, cfg.q_base, cfg.alpha)
            keep = {
                m: torch.bernoulli((1 - q[j]).expand(len(batch)))
                for j, m in enumerate(model.modalities)
            }
        dropped = drop_features(features, q, keep)
        return ModelOutput(model.fuse(dropped), features, unimodal)
