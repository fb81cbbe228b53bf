"""A base method with plug-ins: the base method's hooks unchanged, the plug-ins' loss terms added
to its objective, their modules, figures and state kept beside its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmval.lazy import lazy_module
from mmval.methods.base import Method, TrainContext
from mmval.models import ModelOutput
from mmval.plugins import PLUGINS, Plugin, PluginConfig
from mmval.registry import tag_of

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import Batch, TaggedPositions
    from mmval.models import MultimodalModel
else:
    nn = lazy_module("torch.nn")


class Plugged(Method):
    """`base` trained with `plugins` (in the recipe's order; plug-in i owns model.necks[i]).
    Plain training steps only (`Method.train_step`), which call `objective`: a base method with
    its own step is refused when the recipe is checked."""

    def __init__(self, base: Method, plugins: list[Plugin]) -> None:
        super().__init__(base.config, base.num_classes)
        self.base = base
        self.plugins = plugins

    def train_positions(self, ctx: TrainContext) -> np.ndarray | TaggedPositions | None:
        return self.base.train_positions(ctx)

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        self.base.on_epoch_start(model, ctx)

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        modules = nn.ModuleDict({"base": self.base.build_modules(model)})
        for plugin in self.plugins:
            modules[plugin.config.name] = plugin.build_modules(model)
        return modules

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        for neck in model.necks:
            neck.trace = None  # what the plug-ins read comes from this step's forward
        return self.base.forward(model, batch, ctx)

    def objective(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, figures = self.base.objective(model, out, batch, ctx)
        for plugin in self.plugins:
            extra, own = plugin.objective(model, out, batch)
            loss = loss + extra
            figures = figures | {f"{plugin.config.name}_{k}": v for k, v in own.items()}
        return loss, figures

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        return self.base.after_backward(model, out, batch, ctx)

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        figures = self.base.on_epoch_end(model, ctx)
        for plugin in self.plugins:
            own = plugin.on_epoch_end(model, ctx)
            figures = figures | {f"{plugin.config.name}_{k}": v for k, v in own.items()}
        return figures

    def eval_readouts(self, model: MultimodalModel, out: ModelOutput) -> dict[str, torch.Tensor]:
        return self.base.eval_readouts(model, out)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()  # the plug-ins keep theirs in their necks

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)


def with_plugins(method: Method, configs: Sequence[PluginConfig], num_classes: int) -> Method:
    """`method` as it trains with these plug-ins (itself without any)."""
    if not configs:
        return method
    plugins = [
        PLUGINS[config.name](config, num_classes, position)
        for position, config in enumerate(configs)
    ]
    return Plugged(method, plugins)


def plugin_problems(
    method: type[Method], configs: Sequence[PluginConfig], modalities: list[str] | None
) -> list[tuple[str, str]]:
    """(dotted field, problem) of running these plug-ins on this base method and modalities."""
    found: list[tuple[str, str]] = []
    names = [config.name for config in configs]
    if configs and method.train_step is not Method.train_step:
        found.append(
            (
                "plugins",
                f"{tag_of(method.Config)} runs its own training step, "
                "which adds no plug-in's loss; use a method with plain training steps",
            )
        )
    for i, config in enumerate(configs):
        where = f"plugins[{i}]"
        if names.count(config.name) > 1:
            found.append((where, f"{config.name} is listed more than once"))
        if type(config).last and i != len(configs) - 1:
            found.append(
                (
                    where,
                    f"{config.name} must be the last plug-in (its loss reads the "
                    "fusion head right after its neck)",
                )
            )
        if modalities is not None and len(modalities) < type(config).min_modalities:
            found.append(
                (
                    where,
                    f"{config.name} needs at least {type(config).min_modalities} modalities "
                    f"(got {len(modalities)})",
                )
            )
        found += [(f"{where}.{field}", problem) for field, problem in config.problems(modalities)]
    return found
