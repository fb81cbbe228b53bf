"""The method protocol: what a training method may change in plain joint training.

The engine owns the loop (data, evaluation, checkpoints, resume); a method overrides only the
hooks it needs. The default of every hook is plain training, so `Method` itself is the `concat`
baseline. Hooks, from the lightest to the heaviest:
- `loss` (a different objective; `objective` when its parts should be logged too),
  `after_backward` (edit gradients before the step);
- `forward` (the training forward: masked or dropped modalities, extra heads' outputs);
- `build_modules` (trainable parts the method adds beside the model, e.g. unimodal heads:
  optimised, moved and checkpointed with it, never part of its prediction);
- `train_step` (several backward passes or optimizer steps per batch), through `StepTools`;
- `train_positions`, `on_epoch_start`, `on_epoch_end` (re-sampling, prototypes, re-init), with
  `TrainContext.batches` to read a split in evaluation mode.
Under DDP (docs/distributed.md) every hook runs on every rank with its share of the global batch;
the gradients are averaged over ranks before `after_backward` (and at the latest in
`StepTools.step`), so gradient edits see the global batch's gradient and must be identical on
every rank: statistics they depend on are reduced with `mmval.distributed`. Each method's
docstring says what it reduces.
Prediction (evaluation, valuation) is always the model's own fusion head: a method that changes
how predictions are made does so through a fusion (`model.fusion`), so that every method's
checkpoint is valued the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from mmval.data.dataset import Batch, TaggedPositions
from mmval.distributed import GradientSync, shard_bounds, world_size
from mmval.models import ModelConfig, ModelOutput, MultimodalModel
from mmval.models.fusion import DECOMPOSABLE


class MethodConfig(BaseModel):
    """Base of every method's config; subclasses fix `name` to a Literal (the union's tag)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    fusion: ClassVar[str] = "concat"  # the fusion the method is defined with (report names)

    def label(self) -> str:
        """How runs of this method are named in reports."""
        return self.name

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        """(dotted field, problem) for settings this method cannot run with."""
        return []


def _no_batches(role: str, positions: np.ndarray | None = None) -> Iterator[Batch]:
    raise RuntimeError("this context reads no data")


def too_few_modalities(method: str, modalities: list[str] | None) -> list[tuple[str, str]]:
    """The recipe problem of a balancing method given a single modality."""
    if modalities is not None and len(modalities) < 2:
        return [("data.modalities", f"{method} needs at least two modalities")]
    return []


def logits_problems(
    method: str, model: ModelConfig, use: str = "concat, sum, weighted, late or cosine"
) -> list[tuple[str, str]]:
    """The recipe problem of a method that reads each modality's logits, given a fusion that has
    none."""
    if model.fusion in DECOMPOSABLE:
        return []
    return [
        (
            "model.fusion",
            f"{method} needs per-modality logits; {model.fusion} fusion has none (use {use})",
        )
    ]


def unimodal_cross_entropy(out: ModelOutput, label: torch.Tensor) -> torch.Tensor:
    """sum_m CE(z_m, y) over the fusion's per-modality logits (unimodal supervision)."""
    assert out.unimodal_logits is not None
    return torch.stack([F.cross_entropy(z, label) for z in out.unimodal_logits.values()]).sum()


def window_problems(starts: int, ends: int) -> list[tuple[str, str]]:
    """The recipe problem of an inverted modulation window (inclusive, 0-based epochs)."""
    if ends < starts:
        return [("method.modulation_ends", "must not be before modulation_starts")]
    return []


@dataclass
class TrainContext:
    epoch: int  # 0-based
    epochs: int
    step: int  # optimizer steps taken so far in the run
    # batches(role, positions=None): the "train" or "val" split in a fixed order (or only the
    # given positions, in their order), as the model's device expects, without training-time
    # randomness (prototypes, re-initialisation, weight estimation, valuation)
    batches: Callable[..., Iterator[Batch]] = field(default=_no_batches, repr=False)
    steps_per_epoch: int = 0
    train_size: int = 0  # samples in the train split
    sizes: dict[str, int] = field(default_factory=dict)  # samples per split role

    def rank_batches(self, role: str, positions: np.ndarray | None = None) -> Iterator[Batch]:
        """This rank's contiguous share of `batches(role, positions)` under DDP (shares in rank
        order make the split's order), for a pass whose results the method then reduces or
        gathers; in one process the whole of it."""
        if world_size() == 1:
            return self.batches(role) if positions is None else self.batches(role, positions)
        chosen = np.arange(self.sizes[role]) if positions is None else np.asarray(positions)
        lo, hi = shard_bounds(len(chosen))
        return self.batches(role, chosen[lo:hi])


@dataclass
class StepTools:
    """What a method's own `train_step` may do; the engine owns the optimizer and precision,
    and under DDP the averaging of the gradients over ranks (`gradients`)."""

    optimizer: torch.optim.Optimizer
    autocast: Callable[[], AbstractContextManager[Any]]
    gradients: GradientSync | None = None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_gradients(self) -> None:
        """Average the gradients over DDP ranks now (nothing in one process, nor when nothing
        was back-propagated since the last call): from here they are the global batch's, and a
        method that edits them must do so identically on every rank."""
        if self.gradients is not None:
            self.gradients.reduce()

    def step(self) -> None:
        self.reduce_gradients()
        self.optimizer.step()


@dataclass
class StepResult:
    loss: torch.Tensor  # detached, for the epoch log
    logits: torch.Tensor  # detached fused logits, for the training accuracy
    figures: dict[str, float] = field(default_factory=dict)


class Method:
    Config: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes

    def model_modalities(self, available: list[str]) -> list[str]:
        """The modalities the model is built on (a unimodal baseline keeps one)."""
        return list(available)

    def train_positions(self, ctx: TrainContext) -> np.ndarray | TaggedPositions | None:
        """Sampler hook: the train-split positions for this epoch (repeats allowed), or all;
        `TaggedPositions` also give each entry a tag that its batch carries (`Batch.tag`)."""
        return None

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        """Called before the first step of each epoch."""

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        """Trainable parts beside the model (kept by the method; the engine optimises, moves and
        checkpoints what this returns)."""
        return nn.ModuleDict()

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        """The training forward pass."""
        return model(batch.inputs)

    def train_step(
        self, model: MultimodalModel, batch: Batch, ctx: TrainContext, tools: StepTools
    ) -> StepResult:
        """One batch: forward, loss, backward, gradient edits, optimizer step."""
        with tools.autocast():
            out = self.forward(model, batch, ctx)
            loss, figures = self.objective(model, out, batch, ctx)
        tools.zero_grad()
        loss.backward()
        tools.reduce_gradients()
        figures = figures | self.after_backward(model, out, batch, ctx)
        tools.step()
        return StepResult(loss.detach(), out.logits.detach(), figures)

    def objective(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and figures for the epoch log (the parts of a composite loss); override
        this instead of `loss` when the parts are worth logging."""
        return self.loss(model, out, batch, ctx), {}

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        return F.cross_entropy(out.logits, batch.label)

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        """Edit `.grad` before the optimizer step (under DDP: the gradients averaged over ranks,
        to be edited identically on every rank); returns figures averaged into the epoch log."""
        return {}

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        """Called after the last step of each epoch; returns figures for the epoch log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state a resumed run needs (plain types and tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
