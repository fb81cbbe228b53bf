"""Method-independent training controls on parts of the model: freezing schedules
(`train.freeze`) and optimizer parameter groups (`optim.groups`), both addressed by a module's
dotted attribute path in the model (`encoders.text`, `fusion`, `encoders.visual.trunk.4`).

Freezing follows QMF's `--freeze_img` / `--freeze_txt` (QingyangZhang/QMF
@d7f31dd9f79dbc75796e3f684a1fd058fec1d16f, `text-image-classification/train_qmf.py` 159-160,
184-189: `requires_grad = not (epoch < N)` for every parameter of the module, 0-based epochs;
256-258: the whole model in `train()` every epoch, so a frozen module's BatchNorm statistics still
update and its dropout stays on). A frozen parameter keeps `grad None` (the engine zeroes with
`set_to_none`), so torch's SGD, Adam and AdamW skip it: no update, no weight decay, no optimizer
state, as BertAdam skips it there (`if p.grad is None: continue`). The state is a function of the
recipe and the epoch alone, so a resumed run applies the same one and checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mmval.errors import UserError
from mmval.recipe import OptimConfig


def module_at(model: nn.Module, path: str, field: str) -> nn.Module:
    """The module at `path` in `model`; a path it lacks is a `UserError` naming the model's
    top-level modules (and the entries of a module dict, such as `encoders.<modality>`)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    names = []
    for name, child in model.named_children():
        names.append(name)
        if isinstance(child, nn.ModuleDict):
            names += [f"{name}.{key}" for key in child]
    raise UserError(
        f"{field}: the model has no module {path}; its top-level modules are "
        f"{', '.join(names)} (a path goes on through their attributes, e.g. "
        "encoders.<modality>.<part>)."
    )


def _owned(model: nn.Module, paths: Sequence[str], field: str) -> list[list[nn.Parameter]]:
    """The trainable parameters under each path; a path with none, or a parameter under two
    paths, is a `UserError`."""
    owner: dict[int, str] = {}
    owned = []
    for path in paths:
        params = [p for p in module_at(model, path, field).parameters() if p.requires_grad]
        if not params:
            raise UserError(f"{field}: the module {path} has no trainable parameters.")
        for p in params:
            if id(p) in owner:
                raise UserError(
                    f"{field}: {path} and {owner[id(p)]} share parameters (one lies inside the "
                    "other); name each part once."
                )
            owner[id(p)] = path
        owned.append(params)
    return owned


@dataclass(frozen=True)
class Freezing:
    """`train.freeze` resolved on a model: per path, the epoch its parameters train from (None:
    never) and the parameters (those trainable when the model was built)."""

    schedule: list[tuple[str, int | None, list[nn.Parameter]]]

    def apply(self, epoch: int) -> None:
        """The `requires_grad` of every scheduled parameter for 0-based `epoch`."""
        for _, start, params in self.schedule:
            trainable = start is not None and epoch >= start
            for p in params:
                p.requires_grad_(trainable)


def build_freezing(
    freeze: dict[str, int | str], model: nn.Module, others: Sequence[nn.Parameter]
) -> Freezing | None:
    """`train.freeze` on `model` (None when empty); `others` (the method's own modules) count
    towards what epoch 0 still trains: a schedule that leaves nothing to train is refused."""
    if not freeze:
        return None
    paths = list(freeze)
    owned = _owned(model, paths, "train.freeze")
    schedule = [
        (path, None if freeze[path] == "always" else int(freeze[path]), params)
        for path, params in zip(paths, owned, strict=True)
    ]
    frozen = {id(p) for _, start, params in schedule if start != 0 for p in params}
    if all(id(p) in frozen for p in [*model.parameters(), *others] if p.requires_grad):
        raise UserError(
            "train.freeze freezes every trainable parameter in the first epoch: leave a part "
            "of the model (the fusion head, say) to train."
        )
    return Freezing(schedule)


def param_groups(
    cfg: OptimConfig, model: nn.Module, others: Sequence[nn.Parameter]
) -> list[nn.Parameter] | list[dict[str, Any]]:
    """The optimizer's parameters: the model's then `others`, in one list without
    `optim.groups`; with them, the default group first (so that `param_groups[0]` keeps
    optim.lr, as the logged `lr` and methods read it) holding every parameter no group names,
    then one group per entry in recipe order, each in the model's parameter order."""
    params = [*model.parameters(), *others]
    if not cfg.groups:
        return params
    owned = _owned(model, [g.params for g in cfg.groups], "optim.groups")
    named = {id(p) for group in owned for p in group}
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in named]}]
    for group, mine in zip(cfg.groups, owned, strict=True):
        ids = {id(p) for p in mine}
        settings = {"lr": group.lr, "weight_decay": group.weight_decay}
        groups.append(
            {
                "params": [p for p in params if id(p) in ids],
                **{k: v for k, v in settings.items() if v is not None},
            }
        )
    return groups


def group_columns(cfg: OptimConfig) -> list[str]:
    """The metrics columns of the rates of `param_groups[1:]`."""
    return [f"lr_{g.params}" for g in cfg.groups]
