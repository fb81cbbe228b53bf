"""Plug-ins: components the papers add to any base model (C3R, IMML), listed in a recipe's
`plugins:` and composed with its `method:`. Each file holds one plug-in: its config (an entry of
`plugins:`, tagged by `name`) and its loss terms; its neck (the model part, between the encoders
and the fusion) is in `necks.py`, imported when it is built, so that reading a recipe imports no
torch. To add one, write its file and list its class in PLUGINS (or
`register_plugin` it at run time); neither the loop nor the methods change."""

from __future__ import annotations

from typing import Annotated

from mmval.plugins.base import EpochContext, Plugin, PluginConfig
from mmval.plugins.c3r import C3R
from mmval.plugins.imml import IMML
from mmval.registry import Tagged, register, tag_of

PLUGINS: dict[str, type[Plugin]] = {tag_of(cls.Config): cls for cls in (C3R, IMML)}

# an entry of `plugins:`: a name (`c3r`, every setting at its default) or a mapping
PluginField = Annotated[
    PluginConfig,
    Tagged(lambda: {tag: cls.Config for tag, cls in PLUGINS.items()}, shorthand=True),
]


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Make a plug-in available to recipes (under its config's `name`); returns the class."""
    register(PLUGINS, cls, cls.Config)
    return cls


__all__ = [
    "PLUGINS",
    "EpochContext",
    "Plugin",
    "PluginConfig",
    "PluginField",
    "register_plugin",
]
