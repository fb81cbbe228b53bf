"""The interface every valuation method implements, and the per-batch game it plays.

A method asks the `Game` for the outcome of the subsets it needs (`play(keep)`: which
modalities each subset keeps) and turns their benefits into per-modality contributions. How
subsets are evaluated (masking, batching) is the engine's business, so a method is only the
arithmetic of its definition.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmval.valuation.config import BenefitName, ValuationConfig
from mmval.valuation.engine import SubsetEvaluator


@dataclass
class Outcome:
    """What the model does on K subsets of a batch of B samples."""

    benefit: torch.Tensor  # [K, B] float64: v(S) under the chosen benefit
    confidence: torch.Tensor  # [K, B] float64: softmax probability of the true class
    pred: torch.Tensor  # [K, B] int64
    top: torch.Tensor  # [K, B] float64: the largest softmax probability (the model's confidence)


@dataclass
class BatchValues:
    contribution: torch.Tensor  # [B, M] float64
    v_full: torch.Tensor  # [B] float64: benefit of the full set (as the method defines it)
    pred: torch.Tensor  # [B] prediction from all modalities
    stderr: torch.Tensor | None = None  # [B, M] for sampled methods


class Game:
    """One batch's cooperative game over its modalities; the encoders run once, here."""

    @torch.no_grad()
    def __init__(
        self,
        evaluator: SubsetEvaluator,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        positions: torch.Tensor,
        benefit: BenefitName,
    ) -> None:
        self.evaluator = evaluator
        self.labels = labels
        self.positions = positions  # positions in the split: seeds per-sample sampling
        self.benefit = benefit
        self.m = len(evaluator.modalities)
        self.prepared = evaluator.prepare(inputs)
        self.chunk = evaluator.chunk_size(self.prepared)

    @torch.no_grad()
    def play(self, keep: torch.Tensor) -> Outcome:
        """Outcome of subsets keep [K, M] (the same for every sample) or [K, B, M]."""
        keep = keep.to(self.labels.device)
        if keep.dim() == 2:
            keep = keep[:, None, :].expand(-1, len(self.labels), -1)
        parts = []
        for start in range(0, keep.shape[0], self.chunk):
            logits = self.evaluator.logits(self.prepared, keep[start : start + self.chunk])
            prob = torch.softmax(logits.double(), -1)
            labels = self.labels[None, :, None].expand(logits.shape[0], -1, 1)
            parts.append((prob.gather(-1, labels)[..., 0], logits.argmax(-1), prob.amax(-1)))
        confidence = torch.cat([c for c, _, _ in parts])
        pred = torch.cat([p for _, p, _ in parts])
        top = torch.cat([t for _, _, t in parts])
        if self.benefit == "prob":
            benefit = confidence
        else:
            benefit = (pred == self.labels[None]).double() * keep.sum(-1).double()
        return Outcome(benefit, confidence, pred, top)


class ValuationMethod(ABC):
    """Per-sample, per-modality contributions from the outcomes of modality subsets."""

    name: ClassVar[str]

    def __init__(self, config: ValuationConfig, modalities: list[str]) -> None:
        """Raise a UserError here when the method cannot value this many modalities."""
        self.config = config
        self.m = len(modalities)

    @abstractmethod
    def value(self, game: Game) -> BatchValues: ...
