"""What a task decides in training, evaluation and valuation.

A data set is labelled for one task (`DataManifest.task`: one class per clip, a score, a class
per time segment, a class per voxel); a recipe trains for it. The task owns everything that
depends on what a target is: the head's output size, the loss, the training figure, what
evaluation keeps per sample and the metrics computed from it, the metric runs are selected on,
the columns of predictions.parquet, and the benefit v(S) a valuation plays with. The loop,
the methods and the valuation engine ask the task instead of assuming class labels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from mmval.data.shards import TaskKind
from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.models import ModelOutput

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import Batch
else:
    torch = lazy_module("torch")


class TaskConfig(BaseModel):
    """Base of every task's settings; subclasses fix `name` to a Literal (the registry's tag)."""

    model_config = ConfigDict(extra="forbid")
    name: str


@dataclass
class Outcome:
    """What the model does on K modality subsets of a batch of B samples (`Game.play`)."""

    benefit: torch.Tensor  # [K, B] float64: v(S) under the chosen benefit
    pred: torch.Tensor  # [K, B]: the class (classification) or the task's per-sample score
    # classification only (None otherwise): softmax probability of the true class, and the
    # largest softmax probability (the model's confidence)
    confidence: torch.Tensor | None = None
    top: torch.Tensor | None = None
    # more per-sample values [K, B] by name, for the subsets table (segmentation's per-region
    # Dice)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class Task(ABC):
    Config: ClassVar[type[TaskConfig]]
    kind: ClassVar[TaskKind]
    # the metric a run is selected on (without the split prefix) and its direction
    selected_on: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    # the metrics copied into summary.json and shown by default in reports
    headline: ClassVar[tuple[str, ...]]
    # what the training row logs as train_<name> (the per-sample mean of `train_score`)
    train_figure: ClassVar[str]
    # the subsets-table columns the robustness report averages per subset, with their direction
    subset_metrics: ClassVar[tuple[str, ...]]
    # what `mmval value --benefit` may name, the first being the default
    benefits: ClassVar[tuple[str, ...]]

    def __init__(self, config: TaskConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes

    def target(self, batch: Batch) -> torch.Tensor:
        """The batch's target column: every data set of a task other than classification stores
        one, and `resolve_task` keeps other data from reaching the task."""
        assert batch.target is not None, f"a {self.kind} data set stores a target"
        return batch.target

    def out_dim(self) -> int:
        """What the head predicts per position (per clip, segment or voxel)."""
        return self.num_classes

    @abstractmethod
    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor: ...

    def train_forward(self, model: nn.Module, batch: Batch, epoch: int) -> ModelOutput:
        """The training forward pass of plain training (segmentation drops sequences here)."""
        return model(batch.inputs)

    def eval_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """The evaluation forward pass (segmentation: by sliding windows on large volumes)."""
        return model(inputs)

    def unimodal_loss(self, unimodal: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """sum_m loss(z_m) over per-modality logits (unimodal supervision)."""
        return torch.stack([self.loss(z, batch) for z in unimodal.values()]).sum()

    def class_units(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores [N, C] and their labels [N] of the units a class is predicted for (a
        clip, each segment, each voxel), for methods that read the probability of the true
        class; a task without classes refuses."""
        raise UserError(f"the {self.kind} task predicts no classes")

    @abstractmethod
    def train_score(self, logits: torch.Tensor, batch: Batch) -> float:
        """The batch's sum over samples of the training figure."""

    @abstractmethod
    def collect(self, logits: torch.Tensor, batch: Batch) -> dict[str, np.ndarray]:
        """Per-sample arrays (first axis B) that evaluation keeps of one batch's outputs."""

    @abstractmethod
    def metrics(
        self,
        collected: dict[str, np.ndarray],
        unimodal: dict[str, dict[str, np.ndarray]],
        prefix: str,
    ) -> dict[str, float]:
        """The metrics of a split from its collected arrays (and each modality's own)."""

    @abstractmethod
    def prediction_columns(self, collected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The columns of predictions.parquet besides sample_id (one value per sample)."""

    @abstractmethod
    def outcome(
        self,
        logits: torch.Tensor,
        batch: Batch,
        keep: torch.Tensor,
        benefit: str,
        confidences: bool = False,
    ) -> Outcome:
        """The outcome of subsets keep [K, B, M] from their logits [K, B, ...]; with
        `confidences`, classification also fills the softmax confidences (`Outcome.confidence`,
        `top`), which cost more than the rest and are left out otherwise."""

    @abstractmethod
    def subset_columns(self, outcome: Outcome, batch: Batch) -> dict[str, torch.Tensor]:
        """The subsets table's per-sample columns [K, B] of an outcome (`mmval value --method
        subsets`); the robustness report averages `subset_metrics` of them per subset."""

    def correct(self, pred: np.ndarray, label: np.ndarray) -> np.ndarray | None:
        """Whether each valued sample's prediction from all modalities (`Outcome.pred`) is right,
        where a task has one right answer per sample (None where it has not)."""
        return None

    def check_benefit(self, benefit: str) -> None:
        if benefit not in self.benefits:
            raise UserError(
                f"--benefit {benefit} is not defined for the {self.kind} task; use "
                f"{' or '.join(self.benefits)}."
            )

    def default_benefit(self) -> str:
        return self.benefits[0]
