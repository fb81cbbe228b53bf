"""Dotted-path overrides (`--set train.epochs=1 --set seeds=[0]`) applied to raw config dicts.

Values are parsed as YAML, so `1` is an int, `[0, 1]` a list and `abc` a string; a number in
the path indexes a list (`modalities.0.size=[112,112]`). The result is validated by the same
schema as the file, so an override can never bypass validation. A `retag` hook may rework the
mapping an assignment lands in first (`mmval.compose`: a new tag of a method or scheduler
mapping drops the old type's fields). Recipe files and `--set` values
are read by `load_yaml`, which refuses YAML aliases and deep nesting (below).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import Node

from mmval.errors import UserError
from mmval.validation import shown

MAX_DEPTH = 100  # nesting levels a recipe value may have (recipes use fewer than ten)


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader without aliases and with bounded nesting. An alias (`*name`) repeats an
    anchored value without copying it, so 600 bytes of aliases of aliases stand for 9^9 items
    (the "billion laughs"), which every later step (merging, validation, error messages) would
    walk; recipes never need aliases (`base:` files share settings). Nesting deeper than
    MAX_DEPTH would exhaust Python's recursion in the composer."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Node | None, index: object) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(
                None,
                None,
                f"found the alias *{event.anchor}: mmval refuses YAML aliases (repeat the "
                "value, or share settings through a `base:` file)",
                event.start_mark,
            )
        if self.depth >= MAX_DEPTH:
            raise ComposerError(
                None,
                None,
                f"the value is nested more than {MAX_DEPTH} levels deep",
                self.peek_event().start_mark,
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self.depth -= 1


def load_yaml(text: str) -> Any:
    """One YAML document read safely (no tags that construct objects, no aliases, bounded
    nesting); every refusal is a `yaml.YAMLError`."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as exc:  # an integer of more digits than Python converts
        raise yaml.YAMLError(str(exc)) from None
    finally:
        loader.dispose()


# retag(path, mapping, value): called before `mapping[path[-1]] = value`; may change `mapping`
Retag = Callable[[tuple[str, ...], dict, Any], None]


def apply_overrides(raw: dict, assignments: Sequence[str], retag: Retag | None = None) -> dict:
    result = copy.deepcopy(raw)
    for assignment in assignments:
        path, sep, text = assignment.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            raise UserError(
                f"override {shown(assignment)} is not of the form dotted.path=value "
                "(for example train.epochs=1)."
            )
        try:
            value = load_yaml(text)
        except yaml.YAMLError as exc:
            raise UserError(
                f"override {shown(assignment)}: the value is not valid YAML ({exc})."
            ) from None
        node: dict | list = result
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise UserError(
                        f"override {shown(assignment)}: {where} is not an item of the list."
                    )
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
                continue
            if last:
                if retag is not None:
                    retag(tuple(keys), node, value)
                node[key] = value
                continue
            child = node.setdefault(key, {})
            if not isinstance(child, dict | list):
                raise UserError(f"override {shown(assignment)}: {where} is not a section.")
            node = child
    return result
