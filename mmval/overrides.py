"""Dotted-path overrides (`--set train.epochs=1 --set seeds=[0]`) applied to raw config dicts.

Values are parsed as YAML, so `1` is an int, `[0, 1]` a list and `abc` a string; a number in
the path indexes a list (`modalities.0.size=[112,112]`). The result is validated by the same
schema as the file, so an override can never bypass validation.
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
        node: dict | list = result
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise UserError(f"override {assignment!r}: {where} is not an item of the list.")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
                continue
            if last:
                node[key] = value
                continue
            child = node.setdefault(key, {})
            if not isinstance(child, dict | list):
                raise UserError(f"override {assignment!r}: {where} is not a section.")
            node = child
    return result
