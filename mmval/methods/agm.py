"""AGM: adaptive gradient modulation from Shapley-style unimodal outputs.

Paper: Li, Li, Hu, Xu, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023. Follows the official code (Lingy12/AGM_ICCV2023: `model/CREMAD_net.py`
`GradMod`, `run/CREMAD_main.py` `train`; the M-way ratio of `run/MOSEI_main.py`); spec:
docs/methods.md#agm.

What it changes: after backward, encoder m's gradients are multiplied by k_m, then the gradient
norm is clipped when the head's gradient is large. Per batch:
- masked forwards z(S): the model in eval mode with the inputs of the modalities outside S
  zeroed (as the official `pad_audio`/`pad_visual`); z(all) is the training forward itself;
- unimodal outputs phi_m = sum_{S without m} |S|!(M-|S|-1)!/M! [z(S + m) - z(S)] with z(empty)
  taken as 0, which is the official phi_a = (z(a,v) - z(0,v) + z(a,0)) / 2 at M = 2 (the
  official never uses z(0,0)) and BalanceBenchmark's three-modality formula at M = 3;
- scores s_m = mean_i -log max(softmax(phi_m^i)[y_i], 1e-8); current ratio
  r_m = exp(M/(M-1) (mean_k s_k - s_m)) (exp(s_other - s_m) at M = 2); target ratio r*_m from
  the running means S_m of s_m over all steps so far (before this step's update, S = 0 at the
  start, as the official); k_m = exp(alpha * min(r*_m - r_m, cap)). The official sign is kept
  (BalanceBenchmark flips it, turning damping into amplification) and the official cap of 10;
- inside the modulation window (0-based, inclusive) every gradient of encoder m becomes
  k_m * g; whatever the epoch, if max |grad| of a head weight exceeds `clip_threshold`, all
  model gradients are clipped to norm `clip_norm` (official: 1 and 1; BalanceBenchmark: 5, 5).

Deviations: the official code puts k_m into the graph (backward hooks on phi_m, the loss is
CE(sum_m phi_m) = CE(z) with grads through the masked forwards). Here the loss is plain CE(z) and
the encoder grads are scaled after backward (BalanceBenchmark's equivalent), with the masked
forwards run without grad. For an additive head both give encoder m the gradient k_m * g, except
for one official term through the encoding of a zeroed input, (k_other - k_m)/2 * dz(0, .)/dtheta_m
at M = 2, which has no counterpart here; and the head's own gradients are left unscaled (the
official head gets the mixture of the scaled paths). Hence an additive (decomposable) fusion is
required. Our modulation window is 0-based (the official counts epochs from 1). The masked
forwards reuse the valuation engine's late-fusion path: encoders once per batch in eval mode,
the zero input encoded once, all 2^M subsets from the per-modality logits, so the extra cost is
one no-grad forward plus O(2^M B C) additions.

DDP: each rank runs the masked forwards on its share of the batch; the scores s_m (means over
the batch) are averaged over the ranks weighted by their samples (`batch_mean`), so the running
means, ratios and coefficients are the global batch's and the same on every rank. The gradients
scaled and the head gradients tested for clipping are already averaged over the ranks, so the
scaling and the clipping norm are those of the global batch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from mmval.data.dataset import Batch
from mmval.distributed import batch_mean
from mmval.methods.base import Method, MethodConfig, TrainContext, window_problems
from mmval.models import ModelConfig, ModelOutput, MultimodalModel
from mmval.valuation.engine import LateFusionEvaluator, subset_masks


class AGMConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["agm"] = "agm"
    alpha: float = Field(default=1.0, gt=0, description="modulation strength (official 1.0)")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(default=20, ge=0, description="last modulated epoch (official 20)")
    cap: float = Field(
        default=10.0, gt=0, description="cap of r*_m - r_m in the exponent (official CREMA-D 10)"
    )
    clip_threshold: float = Field(
        default=1.0, gt=0, description="clip when max |head weight grad| exceeds this (official 1)"
    )
    clip_norm: float = Field(default=1.0, gt=0, description="max_norm of the clipping (official 1)")

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)


def shapley_weights(m: int) -> torch.Tensor:
    """[M, 2^M]: phi = weights @ v over the subsets of `subset_masks(m)`; the Shapley weight
    |S|!(M-|S|-1)!/M! enters with + for the subset S + j and with - for S."""
    masks = subset_masks(m)
    sizes = masks.sum(1)
    fact = math.factorial
    weights = torch.zeros(m, 2**m, dtype=torch.float64)
    for s, (row, size) in enumerate(zip(masks.tolist(), sizes.tolist(), strict=True)):
        for j in range(m):
            if row[j]:
                weights[j, s] = fact(size - 1) * fact(m - size) / fact(m)
            else:
                weights[j, s] = -fact(size) * fact(m - size - 1) / fact(m)
    return weights


def unimodal_outputs(subset_logits: torch.Tensor) -> torch.Tensor:
    """phi [M, B, C] from the logits of every subset [2^M, B, C] (row 0, the empty set, unused:
    it counts as 0)."""
    m = int(math.log2(subset_logits.shape[0]))
    values = subset_logits.clone()
    values[0] = 0.0
    weights = shapley_weights(m).to(values)
    return torch.einsum("ms,sbc->mbc", weights, values)


def agm_scores(phi: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """s_m = mean_i -log max(p_m^i[y_i], 1e-8), shape [M]."""
    p = phi.softmax(-1).gather(2, label[None, :, None].expand(phi.shape[0], -1, 1))[..., 0]
    return -p.clamp_min(1e-8).log().mean(1)


def ratios(scores: torch.Tensor) -> torch.Tensor:
    """exp(M/(M-1) (mean_k s_k - s_m)); exp(s_other - s_m) at M = 2."""
    m = scores.shape[0]
    return torch.exp(m / (m - 1) * (scores.mean() - scores))


def coefficients(
    scores: torch.Tensor, running: torch.Tensor, alpha: float, cap: float
) -> torch.Tensor:
    """k_m = exp(alpha min(r*_m - r_m, cap)), r* from the running scores."""
    return torch.exp(alpha * (ratios(running) - ratios(scores)).clamp(max=cap))


class AGM(Method):
    Config: ClassVar[type[MethodConfig]] = AGMConfig
    config: AGMConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.running: torch.Tensor | None = None  # S_m, float64 on the CPU

    @torch.no_grad()
    def subset_logits(
        self, model: MultimodalModel, inputs: dict[str, torch.Tensor], full: torch.Tensor
    ) -> torch.Tensor:
        """[2^M, B, C]: eval-mode logits with absent inputs zeroed; the full set is `full`."""
        names = model.modalities
        was_training = model.training
        model.eval()
        try:
            fills = {m: torch.zeros_like(inputs[m][0]) for m in names}
            evaluator = LateFusionEvaluator(model, names, fills, full.device)
            masks = subset_masks(len(names)).to(full.device)
            keep = masks[:, None, :].expand(-1, full.shape[0], -1)
            logits = evaluator.logits(evaluator.prepare(inputs), keep).float()
        finally:
            model.train(was_training)
        logits[-1] = full.detach().float()
        return logits

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        names = model.modalities
        phi = unimodal_outputs(self.subset_logits(model, batch.inputs, out.logits))
        scores = batch_mean(agm_scores(phi, batch.label), len(batch)).double().cpu()
        if self.running is None:
            self.running = torch.zeros(len(names), dtype=torch.float64)
        coeffs = coefficients(scores, self.running, self.config.alpha, self.config.cap)
        t = ctx.step + 1
        self.running = self.running * (t - 1) / t + scores / t
        if self.config.modulation_starts <= ctx.epoch <= self.config.modulation_ends:
            for m, coeff in zip(names, coeffs.tolist(), strict=True):
                for param in model.encoders[m].parameters():
                    if param.grad is not None:
                        param.grad.mul_(coeff)
        head = [p.grad for p in model.fusion.parameters() if p.grad is not None and p.dim() >= 2]
        largest = max((float(g.abs().max()) for g in head), default=0.0)
        clipped = largest > self.config.clip_threshold
        if clipped:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.clip_norm)
        figures = {f"coef_{m}": c for m, c in zip(names, coeffs.tolist(), strict=True)}
        figures.update({f"score_{m}": s for m, s in zip(names, scores.tolist(), strict=True)})
        figures["clipped"] = float(clipped)
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running = state["running"]
