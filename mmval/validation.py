"""Turn pydantic errors into messages that name the dotted field and what was expected."""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError


def _dotted(loc: Iterable[Any], raw: Any) -> str:
    """Dotted path of `loc`, leaving out the tags pydantic inserts for tagged unions."""
    parts: list[str] = []
    node = raw
    loc = list(loc)
    for depth, key in enumerate(loc):
        if isinstance(node, dict) and key not in node and depth < len(loc) - 1:
            continue  # a union tag such as the method name (missing fields come last)
        parts.append(f"[{key}]" if isinstance(key, int) else str(key))
        node = (
            node.get(key)
            if isinstance(node, dict)
            else (
                node[key]
                if isinstance(node, list) and isinstance(key, int) and key < len(node)
                else None
            )
        )
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and isinstance(key, int) and key < len(node):
        return node[key]
    return None


class _CutRepr(reprlib.Repr):
    """A repr that renders only the first items of the first levels of a value: the full repr
    of a YAML alias bomb (billions of shared items) or a huge list would never end."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 4
        self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxstring = self.maxother = self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        """Without converting all digits (Python refuses ints of more than 4300 digits)."""
        if x.bit_length() > 200:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_CUT = _CutRepr()


def shown(value: Any, limit: int = 60) -> str:
    """`value` for an error message: cut to `limit` characters, built from its first items
    only."""
    text = _CUT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problems_of(exc: ValidationError, raw: Any) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        message = err["msg"]
        if err["type"] == "missing":
            message = "required field is missing"
        elif (
            err["type"] != "extra_forbidden"
            and "input" in err
            and not isinstance(err["input"], dict)
        ):
            message += f" (got {shown(err['input'])})"
        out.append((_dotted(err["loc"], raw), message))
    return out


MAX_PROBLEMS = 20  # lines of a message; a value of a million wrong items is not listed whole


def format_problems(problems: list[tuple[str, str]], what: str) -> str:
    lines = [f"  - {path}: {message}" for path, message in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"  - and {len(problems) - MAX_PROBLEMS} more")
    return f"{what} is invalid:\n" + "\n".join(lines)


def format_validation_error(exc: ValidationError, what: str, raw: Any = None) -> str:
    return format_problems(problems_of(exc, raw), what)
