"""The fields of a pydantic config as `mmval recipe show` and `mmval prep DATASET --list` print
them (name, type, default, description), read from the configs themselves, so that a new method
or data set source is described without editing anything here."""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter
from pydantic_core import PydanticUndefined

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
