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
checkpoint is valued the same way. `eval_readouts` only adds accuracies of other read-outs of the
same model to the evaluation row (an official code that validates with another head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from mmval.distributed import GradientSync, shard_bounds, world_size
from mmval.lazy import lazy_module
from mmval.models import ModelConfig, ModelOutput
from mmval.models.fusions import FUSIONS, FusionConfig, count_phrase
from mmval.registry import tag_of
from mmval.tasks import CLASSIFICATION, Task

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmval.data.dataset import Batch, TaggedPositions
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")
    nn = lazy_module("torch.nn")


class MethodConfig(BaseModel):
    """Base of every method's config; subclasses fix `name` to a Literal (the registry's tag)
    and declare what they need in the ClassVars below, from which `recipe_problems` derives the
    recipe problems shared by all methods; `problems` adds the method's own."""

    model_config = ConfigDict(extra="forbid")
    name: str
    # the fusion the method is defined with: model.fusion when a recipe gives none (with these
    # settings), and report names
    fusion: ClassVar[str] = "concat"
    fusion_settings: ClassVar[dict[str, Any]] = {}
    fusions: ClassVar[tuple[str, ...] | None] = None  # the fusions it can train (None: any)
    # the official code it follows (repository@commit), or why there is none (`recipe show`)
    source: ClassVar[str] = ""
    needs_unimodal_logits: ClassVar[bool] = False  # reads each modality's logits
    needs_additive: ClassVar[bool] = False  # needs fused logits that are the sum of those
    # the tasks (mmval.tasks) the method is defined for: its hooks read class labels unless
    # it says otherwise
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    min_modalities: ClassVar[int] = 1  # of the data (2 for balancing methods)
    max_modalities: ClassVar[int | None] = None
    # the least a quick test run (a few epochs, tiny data) needs: recipe overrides as nested
    # dicts; the strings "{modality}" (the first data modality), "{checkpoint}" (a finished run's
    # best.pt on the data modalities) and "{teachers}" (modality -> a unimodal run's best.pt)
    # stand for what the test prepares
    quick: ClassVar[dict[str, Any]] = {}

    def label(self) -> str:
        """How runs of this method are named in reports."""
        return self.name

    def model_modalities(self, available: list[str]) -> list[str]:
        """The modalities the model is built on (a unimodal baseline keeps one)."""
        return list(available)

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        """(dotted field, problem) for settings this method cannot run with, beyond what the
        ClassVars declare."""
        return []

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        """(field of this config, why) when the method's own phase (modulation, re-sampling,
        re-initialisation, ...) would never act in a run of `epochs` epochs, so that the run
        would silently train as its plain warm-up; None when it acts (the default: methods
        without a warm-up or start epoch). Every method with such a field implements it
        (`never_acts`); a recipe that trips it is refused (`mmval.recipe`)."""
        return None

    @classmethod
    def lacks(cls, fusion: type[FusionConfig]) -> str | None:
        """What this method needs that the fusion does not offer (None: nothing)."""
        if cls.fusions is not None and tag_of(fusion) not in cls.fusions:
            return "fusion"
        if cls.needs_additive and not fusion.additive:
            return "additive"
        if cls.needs_unimodal_logits and not fusion.decomposable:
            return "logits"
        return None

    @classmethod
    def fitting_fusions(cls, count: int | None) -> str:
        """The registered fusions this method can train on `count` modalities, as a list."""
        names = [
            tag
            for tag, fusion in FUSIONS.items()
            if cls.lacks(fusion) is None and (count is None or fusion.takes(count))
        ]
        return " or ".join(", ".join(names).rsplit(", ", 1))

    def recipe_problems(
        self, model: ModelConfig, modalities: list[str] | None
    ) -> list[tuple[str, str]]:
        """Every problem of running this method with this model on these data modalities (None:
        not known yet): those the declared needs and the fusion's capabilities give, then the
        method's own (`problems`)."""
        found: list[tuple[str, str]] = []
        built_on = None if modalities is None else self.model_modalities(modalities)
        count = None if built_on is None else len(built_on)
        fusion = model.fusion
        lacking = None if fusion is None else self.lacks(type(fusion))
        if fusion is not None and lacking is not None:
            found.append(("model.fusion", self._lacking(lacking, fusion.name, count)))
        if modalities is not None and not (
            self.min_modalities <= len(modalities)
            and (self.max_modalities is None or len(modalities) <= self.max_modalities)
        ):
            needed = count_phrase(self.min_modalities, self.max_modalities)
            where = (
                "" if len(modalities) < self.min_modalities else "; pick them with data.modalities"
            )
            found.append(
                (
                    "data.modalities",
                    f"{self.name} needs {needed} modalities (got {len(modalities)}){where}",
                )
            )
        if fusion is not None and built_on is not None and not fusion.takes(len(built_on)):
            takes = count_phrase(fusion.min_modalities, fusion.max_modalities)
            found.append(
                (
                    "model.fusion",
                    f"{fusion.name} fusion takes {takes} modalities and the model is built on "
                    f"{len(built_on)} ({', '.join(built_on)}); use "
                    f"{self.fitting_fusions(len(built_on))}",
                )
            )
        return found + self.problems(model, modalities)

    def _lacking(self, lacking: str, fusion: str, count: int | None) -> str:
        if lacking == "fusion":
            assert self.fusions is not None
            return (
                f"{self.name} works with the {' or '.join(self.fusions)} fusion only; set "
                f"model.fusion: {self.fusions[0]} (got {fusion})"
            )
        use = self.fitting_fusions(count)
        if lacking == "additive":
            return (
                f"{self.name} needs fused logits that are the sum of per-modality logits; "
                f"{fusion} fusion's are not (use {use})"
            )
        return f"{self.name} needs per-modality logits; {fusion} fusion has none (use {use})"


def _no_batches(role: str, positions: np.ndarray | None = None) -> Iterator[Batch]:
    raise RuntimeError("this context reads no data")


def unimodal_cross_entropy(out: ModelOutput, label: torch.Tensor) -> torch.Tensor:
    """sum_m CE(z_m, y) over the fusion's per-modality logits (unimodal supervision)."""
    assert out.unimodal_logits is not None
    return torch.stack([F.cross_entropy(z, label) for z in out.unimodal_logits.values()]).sum()


def window_problems(starts: int, ends: int) -> list[tuple[str, str]]:
    """The recipe problem of an inverted modulation window (inclusive, 0-based epochs)."""
    if ends < starts:
        return [("method.modulation_ends", "must not be before modulation_starts")]
    return []


def never_acts(field: str, first: int, epochs: int, what: str) -> tuple[str, str] | None:
    """The `inactive_reason` of a phase `what` that first acts in 0-based epoch `first`: a
    problem naming `field` when a run of `epochs` epochs ends before it."""
    if first < epochs:
        return None
    return (
        field,
        f"{what} would first act in epoch {first + 1} of a {epochs}-epoch run (train.epochs): "
        "the run would never leave its warm-up; lower it or raise train.epochs",
    )


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
    task: Task = CLASSIFICATION  # what the run trains for (`build_method` sets it)

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes

    def model_modalities(self, available: list[str]) -> list[str]:
        """The modalities the model is built on (the config's `model_modalities`)."""
        return self.config.model_modalities(available)

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
        return self.task.train_forward(model, batch, ctx.epoch)

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
        return self.task.loss(out.logits, batch)

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        """Edit `.grad` before the optimizer step (under DDP: the gradients averaged over ranks,
        to be edited identically on every rank); returns figures averaged into the epoch log."""
        return {}

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        """Called after the last step of each epoch; returns figures for the epoch log."""
        return {}

    def eval_readouts(self, model: MultimodalModel, out: ModelOutput) -> dict[str, torch.Tensor]:
        """Logits [B, C] of other read-outs of the model in evaluation, by name: their accuracy
        is logged beside the prediction's as `<split>_<name>_acc`; never selected on, saved or
        valued."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state a resumed run needs (plain types and tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
