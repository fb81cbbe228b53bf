"""The plug-in protocol: a component that the papers add to *any* base model (their tables read
"QMF + C3R", "late fusion + IMML"), composed with whatever `method:` a recipe trains.

A plug-in acts at two seams and changes nothing else:
- the model: a `Neck` (mmval/models/neck.py) between the encoders and the fusion head (IMML's
  projectors and front-door context, C3R's representation Z). It is part of the model: trained,
  checkpointed, used in evaluation and valuation, so a plug-in checkpoint is evaluated and
  valued like any other. The fusion is built on the neck's output sizes;
- the loss: `objective` adds the plug-in's terms to the base method's loss, reading what the
  neck recorded in the training forward (`Neck.trace`); `build_modules` gives it trainable parts
  beside the model (C3R's instrument), optimised and checkpointed with the method's.
The base method's loss, hooks and fusion stay as they are (`Plugged` composes them,
mmval/methods/plugged.py). A base method that runs its own `train_step` never calls
`objective`, so it takes no plug-in (a recipe problem, not a silent no-op). What a plug-in
keeps across epochs lives in its neck (buffers), so checkpoints and resume need nothing more.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from mmval.lazy import lazy_module
from mmval.models import ModelOutput

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
    from mmval.models.neck import Neck
else:
    nn = lazy_module("torch.nn")


class EpochContext(Protocol):
    """What a plug-in's epoch hook reads of the training context (mmval.methods.TrainContext)."""

    epoch: int

    def rank_batches(self, role: str) -> Iterator[Batch]: ...


class PluginConfig(BaseModel, ABC):
    """Base of every plug-in's config (an entry of a recipe's `plugins:`); subclasses fix `name`
    to a Literal (the registry's tag)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    min_modalities: ClassVar[int] = 1
    # the official code it follows (repository@commit), or why there is none (`recipe show`)
    source: ClassVar[str] = ""
    # must come last in `plugins:`: its loss treats the fusion head alone as the head that reads
    # its neck's output
    last: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # those it is defined for
    # the least a quick test run needs: overrides of this entry's own fields
    quick: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def build_neck(self, dims: dict[str, int], num_classes: int) -> Neck:
        """The module between the encoders (or the previous neck) and the fusion head."""

    def problems(self, modalities: list[str] | None) -> list[tuple[str, str]]:
        """(field of this entry, problem) for settings it cannot run with."""
        return []

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        """(field of this entry, why) when a phase of the plug-in would never act in a run of
        `epochs` epochs (as `MethodConfig.inactive_reason`); None when it acts."""
        return None


class Plugin(ABC):
    """The training side of a plug-in: modules beside the model, loss terms and an epoch hook,
    added to the base method's."""

    Config: ClassVar[type[PluginConfig]]

    def __init__(self, config: PluginConfig, num_classes: int, position: int) -> None:
        self.config = config
        self.num_classes = num_classes
        self.position = position  # of its neck in model.necks

    def neck(self, model: MultimodalModel) -> nn.Module:
        return model.necks[self.position]

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        return nn.ModuleDict()

    @abstractmethod
    def objective(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss terms added to the base method's loss, and figures for the epoch log."""

    def on_epoch_end(self, model: MultimodalModel, ctx: EpochContext) -> dict[str, float]:
        """Figures for the epoch log."""
        return {}
