"""Config fields that hold one of a registry's configs, chosen by its `name` tag when a recipe is
validated, so that a method or fusion registered at run time (a plug-in, a test) validates,
dumps with all its fields and appears in the recipe's JSON schema like the built-in ones.

A pydantic discriminated union is frozen when the model class is built; `Tagged` reads the
registry each time instead. Errors keep pydantic's wording and locations: an unknown tag lists
the registered ones, and a bad field is named by its path (`method.alpha`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

TAG = "name"


def tag_of(config: type[BaseModel]) -> str:
    """The tag a config class answers to: the default of its `name` field."""
    return str(config.model_fields[TAG].default)


def register(registry: dict[str, Any], entry: Any, config: type[BaseModel]) -> None:
    """Add `entry` under its config's tag; another entry under that tag is an error."""
    tag = tag_of(config)
    if registry.get(tag, entry) is not entry:
        raise ValueError(f"{tag!r} is already registered, to {registry[tag]!r}")
    registry[tag] = entry


class Tagged:
    """`Annotated[BaseConfig, Tagged(configs)]`: a field holding one of `configs()` (tag ->
    config class, read at validation time); with `shorthand`, a bare tag stands for
    `{name: tag}` with every other field at its default."""

    def __init__(
        self, configs: Callable[[], Mapping[str, type[BaseModel]]], *, shorthand: bool = False
    ) -> None:
        self.configs = configs
        self.shorthand = shorthand

    def validate(self, value: Any) -> BaseModel:
        configs = self.configs()
        if isinstance(value, BaseModel) and configs.get(getattr(value, TAG, None)) is type(value):
            return value
        if self.shorthand and isinstance(value, str):
            if value not in configs:
                *others, last = [repr(tag) for tag in configs]
                raise PydanticCustomError(
                    "literal_error", f"Input should be {', '.join(others)} or {last}"
                )
            value = {TAG: value}
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from",
            )
        if TAG not in value:
            raise PydanticCustomError(
                "union_tag_not_found", f"Unable to extract tag using discriminator '{TAG}'"
            )
        config = configs.get(value[TAG]) if isinstance(value[TAG], str) else None
        if config is None:
            expected = ", ".join(repr(tag) for tag in configs)
            raise PydanticCustomError(
                "union_tag_invalid",
                f"Input tag {value[TAG]!r} found using '{TAG}' does not match any of the "
                f"expected tags: {expected}",
            )
        return config.model_validate(value)  # its errors keep their place below this field

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.validate,
            # dump the config's own fields, whichever registered class it is
            serialization=core_schema.wrap_serializer_function_ser_schema(
                lambda value, serialize: serialize(value), schema=core_schema.any_schema()
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        generate = handler.generate_json_schema
        refs = {
            tag: generate.generate_inner(config.__pydantic_core_schema__)
            for tag, config in self.configs().items()
        }
        union: JsonSchemaValue = {
            "oneOf": list(refs.values()),
            "discriminator": {
                "propertyName": TAG,
                "mapping": {tag: ref["$ref"] for tag, ref in refs.items() if "$ref" in ref},
            },
        }
        if not self.shorthand:
            return union
        return {"anyOf": [{"type": "string", "enum": list(refs)}, union]}
