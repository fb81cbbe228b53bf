"""Dotted-path overrides (`--set train.epochs=1 --set seeds=[0]`) applied to raw config dicts.

Values are parsed as YAML, so `1` is an int, `[0, 1]` a list and `abc` a string; the result is
validated by the same schema as the file, so an override can never bypass validation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import yaml

from mmval.errors import UserError


def apply_overrides(raw: dict, assignments: Sequence[str]) -> dict:
    result = copy.deepcopy(raw)
    for assignment in assignments:
        path, sep, text = assignment.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            raise UserError(
                f"override {assignment!r} is not of the form dotted.path=value "
                "(for example train.epochs=1)."
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(
                f"override {assignment!r}: the value is not valid YAML ({exc})."
            ) from None
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise UserError(f"override {assignment!r}: {where} is not a section.")
            node = child
        node[keys[-1]] = value
    return result
