"""Run identity from recipe field metadata: the settings hash, the resume key and the message
that refuses a resume all come from one mark per field.

A field is marked in its annotation, `workers: Annotated[int, Effect.NONE] = 0`; a mark covers the
field's whole value (a section included), and an unmarked field is `Effect.RESULT`. Marks are
read on the fields of nested models, not inside lists or dicts of models.

Torch-free, so that anything may ask what identifies a run.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mmval.data.shards import sha256_json

# What enters the settings hash and how: raise it whenever that changes, so that hashes of
# different derivations never meet (summary.json stores it as settings_version; runs written
# before it was stored used version 1).
SETTINGS_VERSION = 2

M = TypeVar("M", bound=BaseModel)


class Effect(Enum):
    """How a recipe field bears on a run."""

    RESULT = "result"  # part of the experimental setting; fixed once a run has started
    RESUMABLE = "resumable"  # part of the setting, yet a resumed run may take a new value
    NONE = "none"  # how or where a run goes, or what it also writes: never what it computes
    RUN = "run"  # which run this is (name, output folder, seed): its folder, not its setting


class AddedLater:
    """Marks a field added after runs were written: `Annotated[X, ADDED_LATER]` when those runs
    computed what its default computes, `Annotated[X, AddedLater(before=v)]` when they computed
    what `v` computes (the field came with a new default). At that value it is left out of a
    run's identity, so those runs keep their settings hash and still count as finished and
    resumable, and a stored dump without the field reads as that value (`normalised`)."""

    def __init__(self, before: Any = PydanticUndefined) -> None:
        self.before = before

    def value(self, info: FieldInfo) -> Any:
        """What the runs written before the field computed with."""
        if self.before is PydanticUndefined:
            return info.get_default(call_default_factory=True)
        return self.before


ADDED_LATER = AddedLater()


def _added_later(info: FieldInfo) -> AddedLater | None:
    return next((m for m in info.metadata if isinstance(m, AddedLater)), None)


SETTING = frozenset({Effect.RESULT, Effect.RESUMABLE})  # what the settings hash covers
FIXED = frozenset({Effect.RESULT})  # what must match to resume a run
FREE_ON_RESUME = frozenset({Effect.RESUMABLE, Effect.NONE})  # what a resume may change
# what a finished run must match to be this run (name, output and seed chose its folder already)
SAME_RUN = frozenset({Effect.RESULT, Effect.RESUMABLE, Effect.NONE})


def effect_of(info: FieldInfo) -> Effect:
    return next((m for m in info.metadata if isinstance(m, Effect)), Effect.RESULT)


def identity(model: BaseModel, effects: frozenset[Effect]) -> dict[str, Any]:
    """The JSON dump of `model` restricted to the fields whose effect is in `effects` (the
    fields of a nested model by their own marks)."""
    return _select(model, model.model_dump(mode="json"), effects)


def _select(model: BaseModel, dump: dict[str, Any], effects: frozenset[Effect]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if effect_of(info) not in effects or name not in dump:
            continue
        value, dumped = getattr(model, name), dump[name]
        mark = _added_later(info)
        if mark is not None and value == mark.value(info):
            continue
        nested = isinstance(value, BaseModel) and isinstance(dumped, dict)
        kept[name] = _select(value, dumped, effects) if nested else dumped
    return kept


def settings_hash(model: BaseModel) -> str:
    """Identifies the experimental setting: every field that changes what a run computes."""
    return sha256_json({"version": SETTINGS_VERSION, "settings": identity(model, SETTING)})[:12]


def marked(model: BaseModel, effects: frozenset[Effect], prefix: str = "") -> list[str]:
    """Dotted names of the fields marked with one of `effects`, in declaration order."""
    names: list[str] = []
    for name, info in type(model).model_fields.items():
        effect, value = effect_of(info), getattr(model, name)
        if effect in effects:
            names.append(prefix + name)
        elif effect is Effect.RESULT and isinstance(value, BaseModel):
            names += marked(value, effects, f"{prefix}{name}.")
    return names


def differing(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves in which two dumps differ."""
    names: list[str] = []
    for key in [*a, *(k for k in b if k not in a)]:
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            names += differing(left, right, f"{prefix}{key}.")
        elif left != right:
            names.append(prefix + key)
    return names


def _at(dump: dict[str, Any], dotted: str) -> Any:
    node: Any = dump
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _shown(value: Any, limit: int = 60) -> str:
    text = "unset" if value is None else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def changes(started: BaseModel, current: BaseModel, effects: frozenset[Effect] = FIXED) -> str:
    """The fields marked with `effects` in which `current` differs from `started`, each as
    "dotted.name (was OLD, now NEW)", comma-separated; empty when none differ."""
    old, new = identity(started, effects), identity(current, effects)
    return ", ".join(
        f"{name} (was {_shown(_at(old, name))}, now {_shown(_at(new, name))})"
        for name in differing(old, new)
    )


def resume_refusal(started: BaseModel, current: BaseModel) -> str | None:
    """Why a run started with `started` cannot continue with `current`, or None if it can:
    the differing fields with both values, and what may change instead."""
    changed = changes(started, current)
    if not changed:
        return None
    return (
        f"it was started with a recipe that differs in {changed} "
        f"(only {', '.join(marked(current, FREE_ON_RESUME))} may change on --resume); "
        "pass --set name=... for a new run, or --overwrite to start this one again"
    )


def normalised(cls: type[M], dump: dict[str, Any]) -> M | None:
    """A stored dump read through today's model (older formats and omitted defaults filled in,
    so it compares with a new dump), or None when today's model no longer accepts it."""
    try:
        model = cls.model_validate(dump)
    except ValidationError:
        return None
    _as_before(model)
    return model


def _as_before(model: BaseModel) -> None:
    """Give the fields added later that a stored dump lacks the value its run computed with
    (`AddedLater.before`), in nested models too."""
    for name, info in type(model).model_fields.items():
        mark = _added_later(info)
        if mark is not None and name not in model.model_fields_set:
            setattr(model, name, mark.value(info))
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _as_before(value)
