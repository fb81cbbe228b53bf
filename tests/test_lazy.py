"""mmval.lazy: a proxy module imports on first use and then steps aside; `no_grad` defers torch."""

from __future__ import annotations

import subprocess
import sys

import torch

from mmval.lazy import no_grad

FIRST_USE = """
import sys
from mmval.lazy import lazy_module
colorsys = lazy_module("colorsys")
assert "colorsys" not in sys.modules
assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
assert colorsys is sys.modules["colorsys"], "the real module takes the proxy's place"
"""


def test_a_lazy_module_imports_on_first_use_and_takes_the_proxys_place():
    done = subprocess.run([sys.executable, "-c", FIRST_USE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_grad_runs_the_call_without_gradients():
    @no_grad
    def double(x: torch.Tensor) -> torch.Tensor:
        """Doubles."""
        return x * 2

    x = torch.ones(2, requires_grad=True)
    assert not double(x).requires_grad and (x * 2).requires_grad
    assert double.__doc__ == "Doubles." and torch.is_grad_enabled()
