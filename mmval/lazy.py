"""Heavy modules (torch, torchvision) imported on first use, so that reading and checking recipes
(`mmval recipe validate`, `mmval recipe show`) never pays their import: a file that names
`torch` at module level imports it as `torch = lazy_module("torch")` (the real import under
`TYPE_CHECKING`, for the annotations), and its functions reach the real module on first call."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class _LazyModule(ModuleType):
    """Stands for the module of its name in the module that made it (`owner`, its globals). The
    first attribute read imports the module and puts it in the proxy's place there, so that
    later reads there are plain module reads (no proxy in between, and what a test patches on
    the real module is seen). Nothing is put in `sys.modules`: `import torch` elsewhere is
    unaffected."""

    def __init__(self, name: str, owner: dict[str, Any]) -> None:
        super().__init__(name)
        self._owner = owner

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        for key, value in list(self._owner.items()):
            if value is self:
                self._owner[key] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> ModuleType:
    """A proxy of the module `name`, to bind at module level: the first attribute read imports
    the module and binds it in the proxy's place in the calling module."""
    return _LazyModule(name, sys._getframe(1).f_globals)


def no_grad(func: Callable[P, R]) -> Callable[P, R]:
    """`@torch.no_grad()` without importing torch when the decorated function is defined: the
    call runs under `torch.no_grad()`."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import torch

        with torch.no_grad():
            return func(*args, **kwargs)

    return wrapper
