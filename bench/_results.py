"""What every benchmark shares: the line naming the machine its figures were measured on, and
publishing them (bench/results/<name>.json, written atomically, and the same JSON object as the
last printed line)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from mmval.atomic import write_text_atomic

RESULTS = Path(__file__).parent / "results"


def machine(with_torch: bool = True) -> str:
    """`x86_64, 2 cores, 3.11.7[, torch 2.9.1+cu128, 2 threads]`."""
    line = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    if with_torch:
        import torch

        line += f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    return line


def publish(name: str, result: dict[str, Any]) -> None:
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
