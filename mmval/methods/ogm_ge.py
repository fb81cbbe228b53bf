"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement.

Paper: Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient
Modulation", CVPR 2022. Follows the official code (GeWu-Lab/OGM-GE_CVPR2022
@343dc1d95c9bda88f105c0da8d24f185e0e98b54, `main.py`, `train_epoch`); spec:
docs/methods.md#ogm_ge.

What it changes: after backward, each encoder's gradients are scaled down when its modality
dominates the batch. With s_m = sum_i softmax(z_m^i)[y_i] over the batch (z_m: modality m's share
of the fused logits, detached), the discrepancy ratio is rho_m = s_m / s_other for two
modalities and, for M > 2, rho_m = mean_{k != m} s_m / s_k (BalanceBenchmark's `OGM_GE3` form,
which reduces exactly to the two-modality ratio). The coefficient is k_m = 1 - tanh(alpha *
relu(rho_m)) if rho_m > 1 else 1; the code's relu(rho), not relu(rho - 1), is kept, so k jumps at
rho = 1. (On an exact tie, rho_a = rho_v = 1, the official two-modality code still modulates
audio; here neither is modulated, as the paper's Eq. 10 reads.) Inside the modulation window
(inclusive, 0-based epochs) every selected gradient of encoder m becomes
k_m * g + N(0, (std(g) + 1e-8)^2), the noise using the std of the unscaled gradient (plain OGM:
k_m * g).

Which parameters: the official code touches only 4-D gradients (conv weights: no BN, bias or
head). `params: auto` does that when the encoder has conv weights and otherwise takes every
weight matrix of the encoder (BalanceBenchmark modulates all non-1-D parameters), since an MLP
encoder has no conv weights and the method would otherwise do nothing.

Needs per-modality logits, so the fusion must be additive (concat, sum or weighted).

DDP: the scores s_m are summed over the ranks (`all_reduce`), so every rank has the global
batch's coefficients; the gradients it edits are already averaged over the ranks (the global
batch's, std(g) included), and the GE noise comes from the global generator, which is in
lockstep on every rank, so every rank adds the same noise. The edit is therefore the
one-process edit of the global batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

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


class OGMGEConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    # localisation [ours]: every segment is a unit of s_m (Tian et al.'s AVE task has no
    # official OGM-GE code)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "localisation")
    name: Literal["ogm_ge"] = "ogm_ge"
    source: ClassVar[str] = "GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54"
    alpha: float = Field(default=0.1, gt=0, description="modulation strength (README default)")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(default=50, ge=0, description="last modulated epoch")
    generalization: bool = Field(default=True, description="add the GE noise (False: plain OGM)")
    params: Literal["auto", "conv", "matrix"] = Field(
        default="auto", description="conv: 4-D grads only (official); matrix: all >= 2-D grads"
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts(
            "modulation_starts", self.modulation_starts, epochs, "the gradient modulation"
        )


def discrepancy_ratios(scores: torch.Tensor) -> torch.Tensor:
    """rho_m = mean over k != m of s_m / s_k, for scores s of shape [M]."""
    pairwise = scores[:, None] / scores[None, :]
    m = scores.shape[0]
    return (pairwise.sum(dim=1) - 1.0) / (m - 1)


def modulation_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    rho = discrepancy_ratios(scores)
    return torch.where(rho > 1, 1 - torch.tanh(alpha * torch.relu(rho)), torch.ones_like(rho))


class OGMGE(Method):
    Config: ClassVar[type[MethodConfig]] = OGMGEConfig
    config: OGMGEConfig

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        assert out.unimodal_logits is not None
        names = model.modalities
        with torch.no_grad():
            scores = torch.stack(
                [self._true_class_mass(out.unimodal_logits[m], batch) for m in names]
            )
            scores = all_reduce(scores)  # the global batch's
            coeffs = modulation_coefficients(scores, self.config.alpha)
        if not self.config.modulation_starts <= ctx.epoch <= self.config.modulation_ends:
            return {}
        for m, coeff in zip(names, coeffs.tolist(), strict=True):
            encoder = model.encoders[m]
            min_dim = self._min_grad_dim(encoder)
            for param in encoder.parameters():
                grad = param.grad
                if grad is None or grad.dim() < min_dim:
                    continue
                if self.config.generalization:
                    noise = torch.randn_like(grad) * (grad.std() + 1e-8)
                    param.grad = grad * coeff + noise
                else:
                    param.grad = grad * coeff
        return {f"coef_{m}": c for m, c in zip(names, coeffs.tolist(), strict=True)}

    def _true_class_mass(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """s_m: the summed softmax probability of the true class over the batch's units (its
        clips; for localisation, every segment of every clip)."""
        units, labels = self.task.class_units(logits, batch)
        return units.float().softmax(1).gather(1, labels[:, None]).sum()

    def _min_grad_dim(self, encoder: torch.nn.Module) -> int:
        if self.config.params == "conv":
            return 4
        if self.config.params == "matrix":
            return 2
        has_conv = any(p.dim() == 4 for p in encoder.parameters())
        return 4 if has_conv else 2
