"""The interface every valuation method implements, and the per-batch game it plays.

A method asks the `Game` for the outcome of the subsets it needs (`play(keep)`: which
modalities each subset keeps) and turns their benefits into per-modality contributions. How
subsets are evaluated (masking, batching) is the engine's business, so a method is only the
arithmetic of its definition.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mmval.lazy import lazy_module, no_grad
from mmval.tasks import CLASSIFICATION, Outcome, Task
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import SubsetEvaluator

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import Batch
else:
    torch = lazy_module("torch")


@dataclass
class BatchValues:
    contribution: torch.Tensor  # [B, M] float64
    v_full: torch.Tensor  # [B] float64: benefit of the full set (as the method defines it)
    pred: torch.Tensor  # [B] prediction from all modalities
    stderr: torch.Tensor | None = None  # [B, M] for sampled methods


class Game:
    """One batch's cooperative game over its modalities; the encoders run once, here. What a
    subset's outcome is worth (its benefit) is the task's (`Task.outcome`)."""

    @no_grad
    def __init__(
        self,
        evaluator: SubsetEvaluator,
        batch: Batch,
        benefit: str,
        task: Task = CLASSIFICATION,
    ) -> None:
        self.evaluator = evaluator
        self.batch = batch
        self.labels = batch.label
        self.positions = batch.index  # positions in the split: seeds per-sample sampling
        self.benefit = benefit
        self.task = task
        self.m = len(evaluator.modalities)
        self.prepared = evaluator.prepare(batch.inputs)
        self.chunk = evaluator.chunk_size(self.prepared)

    @no_grad
    def play(self, keep: torch.Tensor, confidences: bool = False) -> Outcome:
        """Outcome of subsets keep [K, M] (the same for every sample) or [K, B, M]; with
        `confidences`, classification's softmax confidences too (`Task.outcome`)."""
        keep = keep.to(self.labels.device)
        if keep.dim() == 2:
            keep = keep[:, None, :].expand(-1, len(self.labels), -1)
        parts = []
        for start in range(0, keep.shape[0], self.chunk):
            chunk = keep[start : start + self.chunk]
            logits = self.evaluator.logits(self.prepared, chunk)
            parts.append(self.task.outcome(logits, self.batch, chunk, self.benefit, confidences))
        return Outcome(
            *(
                None if values[0] is None else torch.cat(values)
                for values in zip(
                    *((o.benefit, o.pred, o.confidence, o.top) for o in parts), strict=True
                )
            ),
            extra={name: torch.cat([o.extra[name] for o in parts]) for name in parts[0].extra},
        )


class ValuationMethod(ABC):
    """Per-sample, per-modality contributions from the outcomes of modality subsets."""

    name: ClassVar[str]

    def __init__(self, config: ValuationConfig, modalities: list[str]) -> None:
        """Raise a UserError here when the method cannot value this many modalities."""
        self.config = config
        self.m = len(modalities)

    @abstractmethod
    def value(self, game: Game) -> BatchValues: ...
