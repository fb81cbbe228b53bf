"""The method protocol: what a training method may change in plain joint training.

The engine owns the loop (data, forward, backward, optimizer step, evaluation, checkpoints);
a method overrides only the hooks it needs. The default of every hook is plain training, so
`Method` itself is the `concat` baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from mmval.data.dataset import Batch
from mmval.models import ModelConfig, ModelOutput, MultimodalModel


class MethodConfig(BaseModel):
    """Base of every method's config; subclasses fix `name` to a Literal (the union's tag)."""

    model_config = ConfigDict(extra="forbid")
    name: str

    def label(self) -> str:
        """How runs of this method are named in reports."""
        return self.name

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        """(dotted field, problem) for settings this method cannot run with."""
        return []


@dataclass
class TrainContext:
    epoch: int  # 0-based
    epochs: int
    step: int  # optimizer steps taken so far in the run


class Method:
    Config: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes

    def model_modalities(self, available: list[str]) -> list[str]:
        """The modalities the model is built on (a unimodal baseline keeps one)."""
        return list(available)

    def train_positions(self, ctx: TrainContext) -> np.ndarray | None:
        """Sampler hook: the train-split positions for this epoch (repeats allowed), or all."""
        return None

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        """Called before the first step of each epoch."""

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        return F.cross_entropy(out.logits, batch.label)

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        """Edit `.grad` before the optimizer step; returns figures averaged into the epoch log."""
        return {}

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        """Called after the last step of each epoch; returns figures for the epoch log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state a resumed run needs (plain types and tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
