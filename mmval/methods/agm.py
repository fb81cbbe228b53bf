"""AGM: adaptive gradient modulation from Shapley-style unimodal outputs.

Paper: Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023. Follows the official code, lihong2303/AGM_ICCV2023 at commit
5a65542c70b1c7c15c5df291e77fa9cf2bbb9549: `model/CREMAD_net.py` (`GradMod`, `AVClassifier`),
`run/CREMAD_main.py` (`train`, `CREMAD_main`), `utils/config.py`, and the M-way ratio of
`run/MOSEI_main.py`; docs/methods.md#agm.

What it does, per batch:
- masked forwards z(S): the model in eval mode with the inputs of the modalities outside S
  replaced by the input the network reads as zeros (CREMAD_net.py 57-66, 100-105: `zeros_like`
  on inputs the loader has already normalised, `dataloader/CREMAD_loader.py` 130-144). That is
  the mean colour for RGB frames, which mmval normalises inside the encoder (a black frame would
  be -mean/std there), and zeros for spectrograms (the same log(|STFT| + 1e-7) as the official
  loader), flow and feature vectors, which the encoders read as they are; token ids become the
  padding id [ours]. z(all) is the training forward itself;
- unimodal outputs phi_m = sum_{S without m} |S|!(M-|S|-1)!/M! [z(S + m) - z(S)] with z(empty)
  taken as 0, which is the official phi_a = (z(a,v) - z(0,v) + z(a,0)) / 2 at M = 2
  (CREMAD_net.py 10-17, 67-68; the official never uses z(0,0)) and BalanceBenchmark's
  three-modality formula at M = 3;
- scores s_m = mean_i -log max(softmax(phi_m^i)[y_i], 1e-8); current ratio
  r_m = exp(M/(M-1) (mean_k s_k - s_m)) (exp(s_other - s_m) at M = 2, CREMAD_main.py 130-146;
  MOSEI_main.py 101-107 at M = 2 written as a mean); target ratio r*_m from the running means
  S_m of s_m over all steps so far (before this step's update, S = 0 at the start,
  CREMAD_main.py 148-155); k_m = exp(alpha * min(r*_m - r_m, cap)) (lines 151-152: the official
  sign, which BalanceBenchmark flips, turning damping into amplification, and cap 10);
- the scale: inside the modulation window it becomes this step's k (CREMAD_main.py 159-166,
  `update_scale`); outside it stays what it was, 1 before the window and the window's last k
  after it, because the official backward hooks (CREMAD_net.py 39-55) scale every backward pass
  by whatever `update_scale` set last;
- gradient scaling: every gradient of encoder m, and the entries of the head that only
  modality m's logits read (concat: the weight slice W[:, m], as the hooks give
  d/dW_m = k_m g h_m^T), are multiplied by modality m's scale; entries several modalities read
  by the mean of theirs (concat's bias: (k_a + k_v) / 2, the bias gradient of the official
  graph);
- then, whatever the epoch, if max |grad| of a head weight exceeds `clip_threshold`, all model
  gradients are clipped to norm `clip_norm` (CREMAD_main.py 233-238: 1 and 1; BalanceBenchmark:
  5, 5).
The window is 0-based and inclusive: the official epochs count from 1 (CREMAD_main.py 611, 635)
with `modulation_starts <= epoch <= modulation_ends` and defaults 0 and 20 (config.py 74-75),
i.e. its first 20 epochs, which are epochs 0-19 here.

Deviations: the official code puts k_m into the graph (backward hooks on phi_m, the loss is
CE(sum_m phi_m) = CE(z) with grads through the masked forwards). Here the loss is plain CE(z) and
the gradients are scaled after backward (BalanceBenchmark's approach), with the masked forwards
run without grad. For an additive head both give encoder m the gradient k_m g and the head the
scaled slices above, except for the official terms through the masked forwards themselves: the
encoding of an absent input, (k_other - k_m)/2 * dz(0, .)/dtheta at M = 2 (encoder and head
slice), and the difference between the eval-mode (masked) and train-mode encodings of present
inputs, which the official gradient mixes with weights (k_m +- k_other)/2. Hence a decomposable
fusion is required; head entries that several modalities read other than a bias split evenly
(the weighted fusion's mixing weights, the shared head) get the mean of their k [ours]. The
masked forwards reuse the valuation engine's late-fusion path: encoders once per batch in eval
mode, the absent input encoded once, all 2^M subsets from the per-modality logits, so the extra
cost is one no-grad forward plus O(2^M B C) additions. The official `weight_init`
(`utils/function_tools.py` 93-102, `run/CREMAD_main.py` 603) is `model.init: xavier` in the
CREMA-D and Kinetics-Sounds recipes, except that it draws convolutions kaiming-uniform where
mmval draws them kaiming-normal with the same variance.

DDP: each rank runs the masked forwards on its share of the batch; the scores s_m (means over
the batch) are averaged over the ranks weighted by their samples (`batch_mean`), so the running
means, ratios and coefficients are the global batch's and the same on every rank. The gradients
scaled and the head gradients tested for clipping are already averaged over the ranks, so the
scaling and the clipping norm are those of the global batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.distributed import batch_mean
from mmval.lazy import lazy_module, no_grad
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts, window_problems
from mmval.models import ModelConfig, ModelOutput
from mmval.valuation.engine import LateFusionEvaluator, subset_masks

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")


class AGMConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["agm"] = "agm"
    source: ClassVar[str] = "lihong2303/AGM_ICCV2023@5a65542c70b1c7c15c5df291e77fa9cf2bbb9549"
    alpha: float = Field(default=1.0, gt=0, description="modulation strength (official 1.0)")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(
        default=19,
        ge=0,
        description="last modulated epoch, 0-based: the official 20 counts from 1, so its window "
        "is epochs 0-19 here; afterwards the last coefficients keep scaling",
    )
    cap: float = Field(
        default=10.0, gt=0, description="cap of r*_m - r_m in the exponent (official CREMA-D 10)"
    )
    clip_threshold: float = Field(
        default=1.0, gt=0, description="clip when max |head weight grad| exceeds this (official 1)"
    )
    clip_norm: float = Field(default=1.0, gt=0, description="max_norm of the clipping (official 1)")

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts(
            "modulation_starts", self.modulation_starts, epochs, "the gradient modulation"
        )


def absent_input(encoder: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """What stands in for an absent modality: the input the encoder's network reads as zeros,
    as the official `zeros_like` on normalised inputs (`model/CREMAD_net.py` 100-105). RGB
    frames are normalised inside the encoder, so that is the mean colour (as floats, exact);
    spectrograms, flow and vectors are read as they are, so zeros; token ids become the padding
    id, an empty text [ours: the official MOSEI code writes id 0 whatever it stands for]."""
    from mmval.models.encoders import ResNet18Encoder
    from mmval.models.image_encoders import FrameInput

    if isinstance(encoder, ResNet18Encoder | FrameInput) and encoder.rgb:
        colour = encoder.mean.flatten() * 255.0
        return colour.to(sample.device).expand(sample.shape).contiguous()
    pad = getattr(encoder, "pad_id", None)
    if pad is not None and not sample.is_floating_point():
        return torch.full_like(sample, pad)
    return torch.zeros_like(sample)


class HeadShares:
    """The head's gradient entries by the modalities whose logits read them, probed once through
    `unimodal_logits` on unit features. `scale(k)` multiplies an entry that only modality m reads
    by k_m and one that several read by the mean of their k (concat's bias, which every z_m
    reads as b / M); an entry none reads keeps its gradient."""

    def __init__(self, fusion: nn.Module, dims: dict[str, int]) -> None:
        self.fusion = fusion
        self.params = [p for p in fusion.parameters() if p.requires_grad]
        like = self.params[0]
        with torch.enable_grad():
            logits = fusion.unimodal_logits({m: like.new_ones(1, d) for m, d in dims.items()})
            reads = [self._reads(logits[m]) for m in dims]
        self.weights: list[torch.Tensor] = []  # per parameter [M, *shape]: 1/readers where m reads
        self.unread: list[torch.Tensor] = []  # per parameter [*shape]: 1 where none reads
        for by_modality in zip(*reads, strict=True):
            read = torch.stack(by_modality).float()
            count = read.sum(0)
            self.weights.append(read / count.clamp_min(1))
            self.unread.append((count == 0).float())

    def _reads(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter, the entries these logits depend on."""
        grads = torch.autograd.grad(logits.sum(), self.params, retain_graph=True, allow_unused=True)
        return [
            torch.zeros_like(p, dtype=torch.bool) if g is None else g != 0
            for p, g in zip(self.params, grads, strict=True)
        ]

    def scale(self, k: torch.Tensor) -> None:
        """Multiply the head's gradients entrywise by the factors of the coefficients k [M]."""
        for param, weights, unread in zip(self.params, self.weights, self.unread, strict=True):
            if param.grad is not None:
                coeffs = k.to(weights).view(-1, *[1] * param.dim())
                param.grad.mul_((coeffs * weights).sum(0).add_(unread).to(param.grad.dtype))


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
        # the official hooks' scale: None (1) before the window, then the last coefficients
        self.scale: torch.Tensor | None = None
        self.shares: HeadShares | None = None

    @no_grad
    def subset_logits(
        self, model: MultimodalModel, inputs: dict[str, torch.Tensor], full: torch.Tensor
    ) -> torch.Tensor:
        """[2^M, B, C]: eval-mode logits with absent inputs replaced by `absent_input`; the full
        set is `full`."""
        names = model.modalities
        was_training = model.training
        model.eval()
        try:
            fills = {m: absent_input(model.encoders[m], inputs[m][0]) for m in names}
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
            self.scale = coeffs
        if self.scale is not None:
            self.modulate(model, self.scale)
        head = [p.grad for p in model.fusion.parameters() if p.grad is not None and p.dim() >= 2]
        largest = max((float(g.abs().max()) for g in head), default=0.0)
        clipped = largest > self.config.clip_threshold
        if clipped:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.clip_norm)
        scale = torch.ones(len(names)) if self.scale is None else self.scale
        figures = {f"coef_{m}": c for m, c in zip(names, coeffs.tolist(), strict=True)}
        figures.update({f"scale_{m}": c for m, c in zip(names, scale.tolist(), strict=True)})
        figures.update({f"score_{m}": s for m, s in zip(names, scores.tolist(), strict=True)})
        figures["clipped"] = float(clipped)
        return figures

    def modulate(self, model: MultimodalModel, scale: torch.Tensor) -> None:
        """Encoder m's gradients times s_m, the head's by the entries each modality reads."""
        for m, coeff in zip(model.modalities, scale.tolist(), strict=True):
            for param in model.encoders[m].parameters():
                if param.grad is not None:
                    param.grad.mul_(coeff)
        if self.shares is None or self.shares.fusion is not model.fusion:
            self.shares = HeadShares(model.fusion, model.feature_dims)
        self.shares.scale(scale)

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running = state["running"]
        # runs checkpointed before the scale was kept resume unscaled outside the window
        self.scale = state.get("scale")
