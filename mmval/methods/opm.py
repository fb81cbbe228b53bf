"""OPM: on-the-fly prediction modulation (drop the dominant modality's features in training).

Paper: Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(the journal version of OGM-GE). Follows the official code (GeWu-Lab/BML_TPAMI2024, commit
4b3aa4fd841856c4acbebf48549e6c59fbf7635e: `code/models/Classifier.py` `Classifier.forward`,
`calcu_q`, `Modality_drop.execute_drop`, `custom_autograd`; `code/main.py` `train`, whose
`warm_up = 1 if epoch <= 5` switches the dropping off in epochs 0-5; `code/scripts/train_opm.sh`:
q_base 0.5, lam 0.5, p_exe 0.7); spec: docs/methods.md#opm.

What it changes: the training forward. Per batch, inside the modulation window (0-based,
inclusive; official: from epoch 6 to the last one):
- scores s_m = sum_i softmax(z_m^i)[y_i] from the undropped per-modality logits (detached);
  z_m = W_m h_m + b / M, the fusion head's slice for modality m with an equal share of its bias
  (official `t1`, `t2` with bias b/2);
- rho_m = tanh(relu(s_m / sum_{k != m} s_k - 1)), drop probability
  q_m = clip(q_base (1 + alpha rho_m), 0, 1) if rho_m > 0 else 0 (`calcu_q`; `alpha` is the
  official `--lam`, the official `--alpha` being OGM's);
- with probability p_exe the batch is modulated: each sample keeps h_m with probability 1 - q_m,
  and every feature is divided by 1 - theta, theta = sum_m d_m q_m / sum_m d_m (d_m the feature
  size; `custom_autograd` divides the gradient by the same constant); otherwise the features are
  left as they are;
- the fused logits of those features go into plain CE. Evaluation uses the undropped model.

M > 2: the official code is written for two modalities (s_1 / s_2); s_m against the sum of all
other scores is its M-way form (BalanceBenchmark's). At most one modality can have
s_m > sum_{k != m} s_k, so at most one modality is ever dropped and no sample loses all of
them; the official removal of such samples (`update_flag`) therefore never acts and is left out.

Deviations: needs per-modality logits for the scores, so the fusion must be decomposable. The
official model initialises its layers with `main.py` `weight_init` (xavier-normal Linear
weights, zero biases, kaiming-normal convs), which is `model.init: xavier`, set in the
Kinetics-Sounds recipe; the other recipes keep PyTorch's initialisation.

DDP: the scores s_m are summed over the ranks (`all_reduce`, before the batch's draw, so every
rank takes part whether or not the batch is modulated), giving every rank the global batch's
q_m; whether a batch is modulated is drawn from the global generator, in lockstep on every rank,
so the global batch is modulated as a whole, as in one process. The per-sample keep draws come
from the same lockstep stream on each rank's own samples, so they differ from a one-process
run's draws (same distribution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.distributed import all_reduce
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts, window_problems
from mmval.models import ModelConfig, ModelOutput

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")


class OPMConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["opm"] = "opm"
    source: ClassVar[str] = "GeWu-Lab/BML_TPAMI2024@4b3aa4fd841856c4acbebf48549e6c59fbf7635e"
    # quick test runs last a few epochs: modulate from the first
    quick: ClassVar[dict[str, Any]] = {"method": {"modulation_starts": 0}}
    alpha: float = Field(
        default=0.5, ge=0, description="drop-probability gain (official --lam 0.5, train_opm.sh)"
    )
    q_base: float = Field(
        default=0.5, ge=0, le=1, description="base drop probability (official 0.5, train_opm.sh)"
    )
    p_exe: float = Field(
        default=0.7, ge=0, le=1, description="probability that a batch is modulated (0.7)"
    )
    modulation_starts: int = Field(
        default=6, ge=0, description="first modulated epoch (official: none in epochs 0-5)"
    )
    modulation_ends: int | None = Field(
        default=None,
        ge=0,
        description="last modulated epoch; none: the last epoch, as the official code",
    )

    def modulates(self, epoch: int) -> bool:
        """Whether the 0-based epoch is in the modulation window."""
        ends = self.modulation_ends
        return self.modulation_starts <= epoch and (ends is None or epoch <= ends)

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        if self.modulation_ends is None:
            return []
        return window_problems(self.modulation_starts, self.modulation_ends)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts(
            "modulation_starts", self.modulation_starts, epochs, "the feature dropping"
        )


def drop_probabilities(scores: torch.Tensor, q_base: float, alpha: float) -> torch.Tensor:
    """q_m from the batch scores s [M] (`calcu_q`; a 0/0 ratio drops nothing, as there)."""
    others = scores.sum() - scores
    rho = torch.tanh(torch.relu(scores / others - 1))
    q = (q_base * (1 + alpha * rho)).clamp(0.0, 1.0)
    return torch.where(rho > 0, q, torch.zeros_like(q))


def drop_features(
    features: dict[str, torch.Tensor], q: torch.Tensor, keep: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """h_m * keep_m / (1 - theta), keep_m [B] in {0, 1}, theta the size-weighted mean q (< 1,
    since at most one modality has q_m > 0)."""
    dims = torch.tensor([h.shape[1] for h in features.values()], dtype=q.dtype, device=q.device)
    theta = (dims * q).sum() / dims.sum()
    scale = 1 / (1 - theta)
    return {m: h * keep[m][:, None].to(h.dtype) * scale.to(h.dtype) for m, h in features.items()}


class OPM(Method):
    Config: ClassVar[type[MethodConfig]] = OPMConfig
    config: OPMConfig

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        features = model.encode(batch.inputs)
        unimodal = model.fusion.unimodal_logits(features)
        cfg = self.config
        if not cfg.modulates(ctx.epoch):
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
