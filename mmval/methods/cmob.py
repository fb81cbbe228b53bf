"""CMoB: causal-aware modality valuation, then masking of each sample's weak modalities.

Paper: Wang, Cao, Xue, Zhao, Liang, NeurIPS 2025 (OpenReview ygHWfrwFmO). No official code was
found; this follows the poster and a third-party summary of the paper (docs/methods.md#cmob
names the passage behind each rule). What is in neither is marked [ours] and exposed in the
config.

What it changes: the training forward (inputs). At the end of every epoch from warmup - 1 on
[ours: warmup 5, as Wei et al.; the poster's "iterative training ... real-time evaluation", so
every epoch], every training sample is valued in eval mode without gradients
(`mmval.valuation.cmob.CMoB`: with the poster's confidence-conditioned benefit B,
Phi_j = B(S) - B(S minus j) + B({j}); modalities removed by zeroing their features, as the
Shapley valuation CMoB compares with). Modality j is weak for sample i iff Phi_ij <= threshold,
1 [3rd]. The loss is the ordinary CE of the fused logits; the epoch keeps its size (the summary:
the weak modality is not over-sampled, "to avoid over-fitting"). Evaluation uses unmasked
inputs.

Confidence reading (`confidence`, `confidence_score`; mmval/valuation/cmob.py): Conf is the
classifier's confidence, the largest softmax probability (`max_softmax`, the poster's
Conf(F(x))), or `true_class`. The default `treatment` reading compares the full set with S minus
j only, because the literal `subsets` reading marks more modalities weak as M grows, all of them
at once for many samples. Share of weak modalities per correctly classified training sample at
CMoB's first valuation (`python bench/cmob_weak.py`; uci-mfeat views, seed 0, max_softmax;
in brackets the share of samples with every modality weak, i.e. uniform masks):
    M = 2: treatment 0.27 (0.01), subsets 0.34 (0.16)
    M = 6: treatment 0.41 (0.00), subsets 0.67 (0.49)
(imbalanced synthetic pair, M = 2: treatment 0.41 (0.08), subsets 0.53 (0.31)).

Mask strength (the summary: an "adaptive mask" whose strength is alpha; no rule given) [ours]:
a weak modality is masked in proportion to its contribution deficit, as Wei et al. re-sample a
modality by f_s(1 - phi) (their supplement Eq. 7, the method CMoB compares with), capped:
    steps_ij = 1 + threshold - Phi_ij   (1 at the threshold; 1 + (1 - Phi) by default)
    r_ij = alpha * min(steps_ij, deficit_cap) / deficit_cap   if Phi_ij <= threshold
alpha is the strength at the cap, the largest. Phi counts modalities (B(T) = |T|), so one step
is one modality's worth of benefit at any M; the defaults (alpha 0.3, cap 3) give 0.1, 0.2, 0.3
for Phi = 1, 0, <= -1, which covers the M = 2 range -1..3 and spans the grid 0.1-0.3 once used
as fixed strengths. At M > 2 the large deficits (Phi <= 2 - M: without j the prediction is
right, with j wrong or less confident) all get alpha. `deficit_cap: 1` gives every weak
modality alpha, the fixed strength of earlier versions. Phase two, from epoch second_phase * E
on (E/2 [3rd: "two phases"]): the modalities that are not weak are masked too, with
other_scale * alpha / deficit_cap (half the lightest weak mask by default [ours], so "weaker"
than every weak one, as the summary says).

Misclassified samples (the full-set prediction wrong): B(S) = 0, so all their modalities are
weak by construction. `misclassified: mask` (default; the poster makes no exception) masks them
by the same rule, where the deficit still tells their modalities apart: the one whose removal
makes the prediction right (Phi <= 2 - M) gets the strongest mask. `skip` trains them unmasked
[ours]. Either way they are logged apart (below).

Masks [ours, on local features as the summary says: time masking for audio, spatial masking
for frames], by the shape of one sample's input, at random positions drawn per sample from the
global torch generator (seeded and checkpointed by the engine), r the sample's strength:
- [A, B] (spectrograms, feature sequences): one block of round(r T) consecutive time steps
  (SpecAugment-style time masking); `time_axis` says which axis is time, 0 by default (Kaldi
  fbank [T, F], CMU-MOSEI [T, D]); the STFT and PSD spectrograms are stored [F, T]: set 1.
- [K, H, W, C] (RGB frames, optical flow, RGB difference): one square patch of side
  round(sqrt(r H W)), at the same place in every frame.
- [L] token ids (a text encoder with a padding id): round(r n) of the n non-padding tokens,
  chosen at random, become padding (dropped).
- [D] vectors: round(r D) dimensions chosen at random.
Masked values become the encoder's padding id, 128 for uint8 frames and flow (mid-grey, about
the ImageNet mean; zero motion for flow stored as 0..255), and 0 for float inputs.

M > 2: native (2M + 1 subset evaluations per sample, one encoder pass).

Figures per valuation epoch (shares of the valued training samples): `misclassified` (full-set
prediction wrong) and `misclassified_strength` (their mean phase-one mask strength over
modalities); over the correctly classified samples only: `weak` (mean share of weak
modalities), `all_weak` (every modality weak: uniform masks), `masked` (at least one weak),
`weak_<m>`, `phi_<m>` (mean Phi) and `strength_<m>` (mean phase-one strength); and
`valuation_seconds`.

State: Phi and the full-set correctness of every training sample, so a resumed run masks as the
uninterrupted one. A checkpoint of an earlier version (a weak table only) cannot be resumed.

DDP: each rank values its share of the split and the values are gathered
(`cooperation.value_split`), so every rank holds the whole table and logs the same figures. The
masks are drawn per sample from the global generator, in lockstep on every rank, on each rank's
own samples: the same distribution as one process, other draws. The loss is a batch mean, so
the averaged gradients are the global batch's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts
from mmval.methods.cooperation import fill_value, value_split
from mmval.models import ModelConfig, ModelOutput
from mmval.valuation.config import (
    DEFAULT_CONFIDENCE,
    DEFAULT_CONFIDENCE_SCORE,
    ConfidenceName,
    ConfidenceScore,
    ValuationConfig,
)
from mmval.valuation.registry import build_method

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")


class CMoBConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["cmob"] = "cmob"
    source: ClassVar[str] = "no official code (the poster)"
    quick: ClassVar[dict[str, Any]] = {"method": {"warmup": 1}}
    warmup: int = Field(
        default=5, ge=1, description="plain epochs; valuation from the end of warmup - 1 [ours]"
    )

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        """The first masked epoch is `warmup` (valued at the end of epoch warmup - 1)."""
        return never_acts("warmup", self.warmup, epochs, "the masking of weak modalities")

    alpha: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="mask strength of a weak modality at the deficit cap, the largest [ours]",
    )
    deficit_cap: float = Field(
        default=3.0,
        ge=1,
        description="deficit steps (1 + threshold - Phi) at which the strength reaches alpha; "
        "a weak modality gets alpha * min(steps, cap) / cap; 1: alpha for every weak one [ours]",
    )
    other_scale: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="phase two masks the modalities that are not weak with other_scale times "
        "the lightest weak mask, alpha / deficit_cap [ours]",
    )
    second_phase: float = Field(
        default=0.5, ge=0, le=1, description="phase two from epoch second_phase * epochs (E/2)"
    )
    threshold: float = Field(default=1.0, description="weak iff Phi <= threshold [3rd]")
    confidence: ConfidenceName = Field(
        default=DEFAULT_CONFIDENCE,
        description="reading of the confidence condition of B (mmval/valuation/cmob.py): "
        "treatment (S against S minus j only; does not degenerate at M > 2) or subsets (every "
        "evaluated subset, the literal reading) [ours]",
    )
    confidence_score: ConfidenceScore = Field(
        default=DEFAULT_CONFIDENCE_SCORE,
        description="Conf in that condition: max_softmax (the classifier's confidence, the "
        "largest softmax probability, as the poster writes Conf(F(x))) or true_class (the "
        "probability of the label)",
    )
    misclassified: Literal["mask", "skip"] = Field(
        default="mask",
        description="samples whose prediction from every modality is wrong (all their "
        "modalities come out weak): mask them by the same rule, or skip (train them unmasked) "
        "[ours]",
    )
    time_axis: dict[str, Literal[0, 1]] = Field(
        default_factory=dict,
        description="time axis of [A, B] inputs by modality (default 0; STFT/PSD: 1)",
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        if modalities is None:
            return []
        return [
            (f"method.time_axis.{m}", "not one of data.modalities")
            for m in self.time_axis
            if m not in modalities
        ]


def _span(start: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] booleans: start <= t < start + width."""
    steps = torch.arange(size)
    return (steps >= start[:, None]) & (steps < (start + width)[:, None])


def _start(width: torch.Tensor, size: int) -> torch.Tensor:
    """Uniform start in 0 .. size - width for each sample."""
    return (torch.rand(len(width)) * (size - width + 1)).long()


def _choose(eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, L] booleans: `count` [B] of each row's eligible places, chosen at random."""
    scores = torch.rand(eligible.shape).masked_fill(~eligible, 2.0)
    return scores.argsort(1).argsort(1) < count[:, None]


def time_mask(x: torch.Tensor, ratio: torch.Tensor, axis: int, fill: float) -> torch.Tensor:
    """x [B, A, B'] with one block of round(ratio T) steps along `axis` set to `fill`."""
    size = x.shape[1 + axis]
    width = torch.round(ratio.cpu() * size).long().clamp(max=size)
    hit = _span(_start(width, size), width, size)
    hit = hit[:, :, None] if axis == 0 else hit[:, None, :]
    return x.masked_fill(hit.to(x.device), fill)


def square_mask(x: torch.Tensor, ratio: torch.Tensor, fill: float) -> torch.Tensor:
    """x [B, K, H, W, C] with one square of ratio H W pixels, the same in every frame."""
    h, w = x.shape[2:4]
    side = torch.round(torch.sqrt(ratio.cpu().double() * h * w)).long().clamp(max=min(h, w))
    rows = _span(_start(side, h), side, h)
    cols = _span(_start(side, w), side, w)
    hit = rows[:, :, None] & cols[:, None, :]
    return x.masked_fill(hit[:, None, :, :, None].to(x.device), fill)


def token_mask(x: torch.Tensor, ratio: torch.Tensor, pad: int) -> torch.Tensor:
    """Token ids [B, L] with round(ratio n) of each text's n non-padding tokens padded."""
    real = (x != pad).cpu()
    count = torch.round(ratio.cpu() * real.sum(1)).long()
    return x.masked_fill(_choose(real, count).to(x.device), pad)


def dims_mask(x: torch.Tensor, ratio: torch.Tensor, fill: float) -> torch.Tensor:
    """Vectors [B, D] with round(ratio D) dimensions set to `fill`."""
    count = torch.round(ratio.cpu() * x.shape[1]).long()
    eligible = torch.ones(x.shape, dtype=torch.bool)
    return x.masked_fill(_choose(eligible, count).to(x.device), fill)


def mask_input(
    name: str, x: torch.Tensor, ratio: torch.Tensor, encoder: torch.nn.Module, time_axis: int
) -> torch.Tensor:
    """One modality's batch masked with strength ratio [B] (0: unchanged), by its shape."""
    fill = fill_value(x, encoder)
    if x.dim() == 2 and not x.is_floating_point() and hasattr(encoder, "pad_id"):
        return token_mask(x, ratio, fill)
    if x.dim() == 2:
        return dims_mask(x, ratio, fill)
    if x.dim() == 3:
        return time_mask(x, ratio, time_axis, fill)
    if x.dim() == 5:
        return square_mask(x, ratio, fill)
    raise UserError(
        f"cmob masks vectors, token ids, [T, F] sequences and frames [K, H, W, C]; modality "
        f"{name!r} has samples of shape {list(x.shape[1:])}."
    )


class CMoB(Method):
    Config: ClassVar[type[MethodConfig]] = CMoBConfig
    config: CMoBConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        # from the last valuation: Phi [N, M] and whether the full-set prediction is right [N]
        self.phi: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None

    def build_modules(self, model: MultimodalModel) -> torch.nn.ModuleDict:
        config = ValuationConfig(
            method="cmob",
            confidence=self.config.confidence,
            confidence_score=self.config.confidence_score,
        )
        self.valuation = build_method(config, model.modalities)
        return torch.nn.ModuleDict()

    def strength(self, phi: torch.Tensor, correct: torch.Tensor, second: bool) -> torch.Tensor:
        """Mask ratios [B, M] for contributions phi [B, M] of samples whose full-set prediction
        is `correct` [B]: a weak modality alpha * min(steps, cap) / cap with steps = 1 +
        threshold - Phi, in phase two the others other_scale times the lightest weak mask."""
        cfg = self.config
        steps = (1 + cfg.threshold - phi).clamp(max=cfg.deficit_cap)
        other = cfg.alpha * cfg.other_scale / cfg.deficit_cap if second else 0.0
        ratio = torch.where(phi <= cfg.threshold, cfg.alpha * steps / cfg.deficit_cap, other)
        if cfg.misclassified == "skip":
            ratio = ratio * correct[:, None]
        return ratio

    def mask_ratios(self, index: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor | None:
        """Mask strength [B, M] of each sample's modalities this epoch (None: no valuation yet)."""
        if self.phi is None or self.correct is None:
            return None
        index = index.cpu()
        second = epoch >= self.config.second_phase * epochs
        return self.strength(self.phi[index], self.correct[index], second)

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        ratios = self.mask_ratios(batch.index, ctx.epoch, ctx.epochs)
        if ratios is None:
            return model(batch.inputs)
        inputs = dict(batch.inputs)
        for j, m in enumerate(model.modalities):
            if bool((ratios[:, j] > 0).any()):
                axis = self.config.time_axis.get(m, 0)
                inputs[m] = mask_input(m, inputs[m], ratios[:, j], model.encoders[m], axis)
        return model(inputs)

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        if ctx.epoch < self.config.warmup - 1:
            return {}
        started = time.perf_counter()
        valued = value_split(model, ctx, self.valuation)
        positions = torch.from_numpy(valued.positions)
        self.phi = torch.full((ctx.train_size, len(model.modalities)), torch.inf)
        self.phi[positions] = torch.from_numpy(valued.contributions).float()
        assert valued.correct is not None  # cmob is a classification method
        self.correct = torch.ones(ctx.train_size, dtype=torch.bool)
        self.correct[positions] = torch.from_numpy(valued.correct)
        figures = {"valuation_seconds": time.perf_counter() - started}
        return figures | self.figures(model.modalities, positions)

    def figures(self, modalities: list[str], positions: torch.Tensor) -> dict[str, float]:
        """Shares over the valued samples; the per-modality ones over the correctly classified
        samples only, since a misclassified sample has every modality weak by construction."""
        assert self.phi is not None and self.correct is not None
        phi, correct = self.phi[positions], self.correct[positions]
        weak = phi <= self.config.threshold
        ratio = self.strength(phi, correct, second=False)
        right, wrong = weak[correct], ratio[~correct].double()
        figures = {
            "misclassified": float((~correct).double().mean()),
            "misclassified_strength": float(wrong.mean()) if wrong.numel() else 0.0,
            "weak": float(right.double().mean()),
            "masked": float(right.any(1).double().mean()),
            "all_weak": float(right.all(1).double().mean()),
        }
        for j, m in enumerate(modalities):
            figures[f"weak_{m}"] = float(right[:, j].double().mean())
            figures[f"phi_{m}"] = float(phi[correct, j].double().mean())
            figures[f"strength_{m}"] = float(ratio[correct, j].double().mean())
        return figures

    def state_dict(self) -> dict[str, Any]:
        if self.phi is None or self.correct is None:
            return {}
        return {"phi": self.phi, "correct": self.correct}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weak" in state:
            raise UserError(
                "this run was started by an older mmval whose cmob kept only which modalities "
                "were weak, not the contributions that now set each mask's strength; start it "
                "afresh (a new name or output) or resume it with the mmval version that began it."
            )
        if "phi" in state:
            self.phi, self.correct = state["phi"], state["correct"]
