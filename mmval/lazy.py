"""Heavy modules (torch, torchvision) imported on first use, so that reading and checking recipes
(`mmval recipe validate`, `mmval recipe show`) never pays their import: a file that names
`torch` at module level imports it as `torch = lazy_module("torch")` (the real import under
`TYPE_CHECKING`, for the annotations), and its functions reach the real module on first call."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class _LazyModule(ModuleType):
    """Stands for the module of its name; the first attribute read imports that module, and each
    attribute read is then kept on the proxy, so later reads cost what a module's do. Nothing is
    put in `sys.modules`: `import torch` elsewhere is unaffected."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> ModuleType:
    """A proxy of the module `name` that imports it on the first attribute read."""
    return _LazyModule(name)


def no_grad(func: Callable[P, R]) -> Callable[P, R]:
    """`@torch.no_grad()` without importing torch when the decorated function is defined: the
    call runs under `torch.no_grad()`."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import torch

        with torch.no_grad():
            return func(*args, **kwargs)

    return wrapper
