"""What `mmval recipe show` and `mmval prep DATASET --list` print: the registered methods,
fusions and plug-ins, and the fields of a pydantic config (name, type, default, description),
read from the registries and the configs themselves, so that a new method or data set source is
listed without editing anything here."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter
from pydantic_core import PydanticUndefined

from mmval.errors import UserError

_PLAIN = TypeAdapter(Any)


@dataclass(frozen=True)
class FieldDoc:
    """One settable field: its dotted name (as `--set` takes it), type, default and meaning."""

    name: str
    type: str
    default: str
    description: str


def type_name(annotation: Any) -> str:
    """A short reading of a field's type: `list[int]`, `step | linear`, `float | None`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _shown(value: Any) -> str:
    return json.dumps(_PLAIN.dump_python(value, mode="json"), ensure_ascii=False)


def field_docs(
    model: type[BaseModel] | BaseModel, prefix: str = "", skip: tuple[str, ...] = ()
) -> list[FieldDoc]:
    """The fields of a config class (defaults: the class's) or of a config instance (defaults:
    its values, e.g. a data set's parameters as its manifest sets them); fields holding a config,
    or a list of configs, are listed field by field (`modalities.0.size`)."""
    cls = model if isinstance(model, type) else type(model)
    docs = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        dotted = f"{prefix}{name}"
        if isinstance(model, BaseModel):
            value = getattr(model, name)
        else:
            value = info.get_default(call_default_factory=True, validated_data={})
        if isinstance(value, BaseModel):
            docs += field_docs(value, f"{dotted}.")
            continue
        if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, item in enumerate(value):
                docs += field_docs(item, f"{dotted}.{i}.")
            continue
        default = "required" if value is PydanticUndefined else _shown(value)
        docs.append(FieldDoc(dotted, type_name(info.annotation), default, info.description or ""))
    return docs


def summary(obj: type) -> str:
    """The first sentence of the docstring of the module that defines `obj`."""
    doc = sys.modules[obj.__module__].__doc__ or obj.__doc__ or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


@dataclass(frozen=True)
class Component:
    """A method, fusion or plug-in as `mmval recipe show` describes it."""

    kind: Literal["method", "fusion", "plug-in"]
    name: str
    summary: str
    source: str  # the official code followed (repository@commit), or why none
    tasks: tuple[str, ...]  # those it is defined for; () for fusions (any task's head)
    notes: tuple[str, ...]  # what else a recipe must know (its fusion, how many modalities)
    fields: tuple[FieldDoc, ...]


def components() -> list[Component]:
    """Every registered method, then fusion, then plug-in (run-time registrations included)."""
    from mmval.methods import METHODS
    from mmval.models.fusions import FUSIONS, count_phrase
    from mmval.plugins import PLUGINS

    found = []
    for name, method in METHODS.items():
        config = method.Config
        fusions = "any" if config.fusions is None else ", ".join(config.fusions)
        notes = (
            f"fusion: {config.fusion} by default (trains with: {fusions})",
            f"modalities: {count_phrase(config.min_modalities, config.max_modalities)}",
        )
        found.append(
            Component(
                "method",
                name,
                summary(method),
                config.source,
                config.tasks,
                notes,
                tuple(field_docs(config, "method.", skip=("name",))),
            )
        )
    for name, fusion in FUSIONS.items():
        takes = count_phrase(fusion.min_modalities, fusion.max_modalities)
        own = "with per-modality logits" if fusion.decomposable else "no per-modality logits"
        found.append(
            Component(
                "fusion",
                name,
                summary(fusion),
                fusion.source,
                (),
                (f"modalities: {takes}", own),
                tuple(field_docs(fusion, "model.fusion.", skip=("name",))),
            )
        )
    for name, plugin in PLUGINS.items():
        config = plugin.Config
        found.append(
            Component(
                "plug-in",
                name,
                summary(plugin),
                config.source,
                config.tasks,
                (f"modalities: at least {config.min_modalities}",),
                tuple(field_docs(config, "plugins[].", skip=("name",))),
            )
        )
    return found


def find_components(name: str) -> list[Component]:
    """The components called `name` (a method and a fusion may share one: concat, qmf, tmc)."""
    every = components()
    found = [c for c in every if c.name == name]
    if not found:
        raise UserError(
            f"no method, fusion or plug-in is called {name!r}; `mmval recipe show` lists them: "
            f"{', '.join(sorted({c.name for c in every}))}."
        )
    return found


def describe_values(values: Mapping[str, Any], model: type[BaseModel]) -> list[FieldDoc]:
    """The fields of `model` with `values` (a manifest's `params`) as their defaults where they
    validate as a whole, else the class's defaults with those values laid over them."""
    try:
        return field_docs(model.model_validate(dict(values)))
    except ValueError:
        docs = field_docs(model)
        return [
            FieldDoc(d.name, d.type, _shown(values[d.name]), d.description)
            if d.name in values
            else d
            for d in docs
        ]
