"""Composed recipes: `base: [path, ...]` at the top of a recipe or sweep file.

Each base is read (its path relative to the file that names it; bases may name bases), the bases
are merged in order, then the file's own fields on top, then the `--set` overrides. Mappings merge
key by key; lists and scalars replace. A mapping whose discriminator (`name` of a method, a
scheduler or a fusion, `kind` of an encoder) differs from the base's replaces the base's mapping
whole, so that the fields of one method or encoder kind never leak into another. `base` itself
never reaches the schema.

The same holds for `--set` on such a key: `--set optim.scheduler.name=cosine` makes the mapping
a cosine scheduler's, keeping only the keys a cosine scheduler also has (`variant_fields` says
which; without it, only the new tag), so that one override switches the type.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmval.errors import UserError
from mmval.overrides import apply_overrides, load_yaml
from mmval.validation import shown

BASE_KEY = "base"

# Recipe paths whose mapping is one of several configs told apart by a key ("*": any key).
DISCRIMINATORS: dict[tuple[str, ...], str] = {
    ("method",): "name",
    ("optim", "scheduler"): "name",
    ("model", "fusion"): "name",
    ("model", "encoder"): "kind",
    ("model", "encoders", "*"): "kind",
}


def _discriminator(path: tuple[str, ...]) -> str | None:
    for pattern, key in DISCRIMINATORS.items():
        if len(pattern) != len(path):
            continue
        if all(want in ("*", got) for want, got in zip(pattern, path, strict=True)):
            return key
    return None


def merge(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """`over` on top of `base` (neither is changed), by the rule of the module docstring."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return copy.deepcopy(over)
    key = _discriminator(path)
    if key is not None and key in base and key in over and base[key] != over[key]:
        return copy.deepcopy(over)
    merged = copy.deepcopy(base)
    for name, value in over.items():
        merged[name] = merge(base.get(name), value, (*path, str(name)))
    return merged


def _read(path: Path, chain: tuple[Path, ...]) -> Any:
    what = f"recipe base {path} (named by {chain[-1]})" if chain else f"recipe {path}"
    if not path.is_file():
        raise UserError(f"{what if chain else f'recipe file {path}'} does not exist.")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{what} is not valid YAML: {exc}") from None
    if chain and not isinstance(raw, dict):
        raise UserError(f"{what} must be a YAML mapping of recipe fields.")
    return raw


def _base_paths(raw: dict[str, Any], path: Path) -> list[Path]:
    names = raw[BASE_KEY]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise UserError(
            f"{path}: base must be a file name or a list of file names, relative to "
            f"{path.parent}; it is {shown(names)}."
        )
    return [path.parent / name for name in names]


def _compose(path: Path, chain: tuple[Path, ...]) -> Any:
    """The file at `path` with its bases merged in; `chain`: the files that led to it."""
    raw = _read(path, chain)
    if not isinstance(raw, dict) or BASE_KEY not in raw:
        return raw
    here = (*chain, path)
    composed: dict[str, Any] = {}
    for base in _base_paths(raw, path):
        if base.resolve() in {p.resolve() for p in here}:
            cycle = " -> ".join(str(p) for p in (*here, base))
            raise UserError(f"recipe bases form a cycle: {cycle}.")
        composed = merge(composed, _compose(base, here))
    return merge(composed, {k: v for k, v in raw.items() if k != BASE_KEY})


# variant_fields(path, key, tag): the fields of the config the mapping at `path` is with
# `key: tag` (None: not known)
VariantFields = Callable[[tuple[str, ...], str, Any], "set[str] | None"]


def retagger(variant_fields: VariantFields | None, kept: list[str]) -> Callable[..., None]:
    """The `retag` hook of `apply_overrides` for tagged mappings: a new tag empties the mapping
    but for the keys the new type also has (their dotted paths are added to `kept`)."""

    def retag(path: tuple[str, ...], mapping: dict, value: Any) -> None:
        where, key = path[:-1], path[-1]
        if ".".join(path) in kept:  # set anew: no longer left over
            kept.remove(".".join(path))
        # a mapping without its tag is of the default type: filtered all the same
        if _discriminator(where) != key or not mapping or mapping.get(key) == value:
            return
        fields = variant_fields(where, key, value) if variant_fields is not None else None
        keep = {k: v for k, v in mapping.items() if k != key and k in (fields or ())}
        mapping.clear()
        mapping.update(keep)
        kept.extend(".".join((*where, k)) for k in keep)

    return retag


def compose_recipe(
    path: Path,
    overrides: Sequence[str] = (),
    variant_fields: VariantFields | None = None,
    kept: list[str] | None = None,
) -> Any:
    """A recipe or sweep file as the schema reads it: its bases, its own fields, then `--set`
    (a new tag by the rule of the module docstring; the keys kept then are added to `kept`).

    The one reader of recipe files (`load_recipe`, `load_plan`, the quickstart's packaged
    recipes); a file that is not a mapping comes back as read, for the caller to report.
    """
    raw = _compose(Path(path), ())
    if overrides and isinstance(raw, dict):
        retag = retagger(variant_fields, kept if kept is not None else [])
        raw = apply_overrides(raw, overrides, retag)
    return expand_environment(raw, str(path))


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_environment(raw: Any, where: str, path: tuple[str, ...] = ()) -> Any:
    """`${NAME}` in a string value replaced by the environment variable NAME, after `--set`
    (so that a field given on the command line needs no variable): where the weights of
    pretrained encoders live differs between machines, and a recipe names them once,
    `pretrained: ${MMVAL_WEIGHTS}/resnet152-394f9c45.pth`. An unset variable is a user error
    naming the field."""
    if isinstance(raw, dict):
        return {k: expand_environment(v, where, (*path, str(k))) for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand_environment(v, where, (*path, str(i))) for i, v in enumerate(raw)]
    if not isinstance(raw, str) or "${" not in raw:
        return raw

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise UserError(
                f"{where}: {'.'.join(path)} names the environment variable {name}, which is "
                f"not set: export {name}=/path (the folder of the files it names), or give the "
                f"field with --set {'.'.join(path)}=..."
            )
        return os.environ[name]

    return _VARIABLE.sub(value, raw)
