"""CMoB: causal-aware modality valuation, then masking of each sample's weak modalities.

Paper: Wang, Cao, Xue, Zhao, Liang, NeurIPS 2025 (OpenReview ygHWfrwFmO). No official code was
found; this follows the spec built from the poster and a third-party summary
(docs/methods.md#cmob). What is neither in the poster nor in the
summary is marked [ours] and exposed in the config.

What it changes: the training forward (inputs). At the end of every epoch from warmup - 1 on
[ours: warmup 5, as Wei et al.; the poster values "in real time", i.e. every epoch], every
training sample is valued in eval mode without gradients (`mmval.valuation.cmob.CMoB`: with the
confidence-conditioned benefit B, Phi_j = B(S) - B(S minus j) + B({j}); modalities removed by
zeroing their features, as the Shapley valuation CMoB compares with). Modality j is weak for
sample i iff Phi_ij <= 1 [3rd] (`threshold`). In the next epoch the weak modalities' inputs of
each sample are masked with strength alpha; from epoch second_phase * E on (E/2 by default
[3rd: "two phases"]) its other modalities are masked too, with alpha * other_scale (alpha / 2
[ours] for the summary's "weaker"). The loss is the ordinary CE of the fused logits; the epoch
keeps its size (the summary: the weak modality is not over-sampled, "to avoid over-fitting").
Evaluation uses unmasked inputs.

Masks [ours], by the shape of one sample's input, at random positions drawn per sample from the
global torch generator (seeded and checkpointed by the engine):
- [A, B] (spectrograms, feature sequences): one block of round(alpha T) consecutive time steps
  (SpecAugment-style time masking); `time_axis` says which axis is time, 0 by default (Kaldi
  fbank [T, F], CMU-MOSEI [T, D]); the STFT and PSD spectrograms are stored [F, T]: set 1.
- [K, H, W, C] (RGB frames, optical flow, RGB difference): one square of side
  round(sqrt(alpha H W)), at the same place in every frame.
- [L] token ids (a text encoder with a padding id): round(alpha n) of the n non-padding tokens,
  chosen at random, become padding (dropped).
- [D] vectors: round(alpha D) dimensions chosen at random.
Masked values become the encoder's padding id, 128 for uint8 frames and flow (mid-grey, about
the ImageNet mean; zero motion for flow stored as 0..255), and 0 for float inputs. The masks
are not "adaptive" beyond choosing per sample which modalities are masked: the summary names
adaptive masking without a rule.

M > 2: native (2M + 1 subset evaluations per sample, one encoder pass).

Figures per valuation epoch: `valuation_seconds`, `phi_<m>` (mean Phi), `weak_<m>` (samples
whose m is masked with alpha next epoch), `masked` (samples with at least one weak modality).

DDP: each rank values its share of the split and the values are gathered
(`cooperation.value_train_split`), so every rank holds the whole weak table and logs the same
figures. The masks are drawn per sample from the global generator, in lockstep on every rank,
on each rank's own samples: the same distribution as one process, other draws. The loss is a
batch mean, so the averaged gradients are the global batch's.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from mmval.data.dataset import Batch
from mmval.errors import UserError
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.methods.cooperation import fill_value, value_train_split
from mmval.models import ModelConfig, ModelOutput, MultimodalModel
from mmval.valuation.config import ConfidenceName, ValuationConfig
from mmval.valuation.registry import build_method


class CMoBConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["cmob"] = "cmob"
    quick: ClassVar[dict[str, Any]] = {"method": {"warmup": 1}}
    warmup: int = Field(
        default=5, ge=1, description="plain epochs; valuation from the end of warmup - 1 [ours]"
    )
    alpha: float = Field(
        default=0.2, gt=0, le=1, description="mask strength of weak modalities [ours; grid 0.1-0.3]"
    )
    other_scale: float = Field(
        default=0.5, ge=0, le=1, description="phase two masks the others with alpha * this [ours]"
    )
    second_phase: float = Field(
        default=0.5, ge=0, le=1, description="phase two from epoch second_phase * epochs (E/2)"
    )
    threshold: float = Field(default=1.0, description="weak iff Phi <= threshold [3rd]")
    confidence: ConfidenceName = Field(
        default="subsets",
        description="reading of the confidence condition of B (mmval/valuation/cmob.py): "
        "subsets (every evaluated subset) or treatment (S against S minus j only) [ours]",
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
        self.weak: torch.Tensor | None = None  # [N, M] bool, from the last valuation

    def build_modules(self, model: MultimodalModel) -> torch.nn.ModuleDict:
        config = ValuationConfig(method="cmob", confidence=self.config.confidence)
        self.valuation = build_method(config, model.modalities)
        return torch.nn.ModuleDict()

    def mask_ratios(self, index: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor | None:
        """Mask strength [B, M] of each sample's modalities this epoch (None: no valuation yet)."""
        if self.weak is None:
            return None
        cfg = self.config
        other = cfg.alpha * cfg.other_scale if epoch >= cfg.second_phase * epochs else 0.0
        weak = self.weak[index.cpu()]
        return torch.where(weak, cfg.alpha, other)

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
        positions, phi = value_train_split(model, ctx, self.valuation)
        weak = torch.zeros(ctx.train_size, len(model.modalities), dtype=torch.bool)
        weak[torch.from_numpy(positions)] = torch.from_numpy(phi <= self.config.threshold)
        self.weak = weak
        figures = {"valuation_seconds": time.perf_counter() - started}
        figures["masked"] = float(weak.any(1).sum())
        for j, m in enumerate(model.modalities):
            figures[f"weak_{m}"] = float(weak[:, j].sum())
            figures[f"phi_{m}"] = float(phi[:, j].mean())
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {} if self.weak is None else {"weak": self.weak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weak" in state:
            self.weak = state["weak"]
