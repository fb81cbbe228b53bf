"""The registered methods, fusions and plug-ins as `mmval recipe show` lists them: what each is
(its module's first sentence), the official code it follows (its config's `source`), the tasks
it is defined for and its settings, all read from the registries (run-time registrations
included)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from mmval.describe import FieldDoc, field_docs
from mmval.errors import UserError
from mmval.methods import METHODS
from mmval.models.fusions import FUSIONS, count_phrase
from mmval.plugins import PLUGINS


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
