"""Turn pydantic errors into messages that name the dotted field and what was expected."""

from __future__ import annotations

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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
            message += f" (got {_shown(err['input'])})"
        out.append((_dotted(err["loc"], raw), message))
    return out


def format_problems(problems: list[tuple[str, str]], what: str) -> str:
    lines = "\n".join(f"  - {path}: {message}" for path, message in problems)
    return f"{what} is invalid:\n{lines}"


def format_validation_error(exc: ValidationError, what: str, raw: Any = None) -> str:
    return format_problems(problems_of(exc, raw), what)
