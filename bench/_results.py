"""What every benchmark shares: the line naming the machine its figures were measured on,
synthetic audio-visual data, the `--quick` smoke-test flag, and publishing the figures
(bench/results/<name>.json, written atomically, and the same JSON object as the last printed
line)."""

from __future__ import annotations

import argparse
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


def add_quick(parser: argparse.ArgumentParser) -> None:
    """`--quick`: the smoke test's run, tiny sizes, figures printed but never published."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: tiny sizes; prints the JSON, writes nothing to bench/results",
    )


def publish(name: str, result: dict[str, Any], quick: bool = False) -> None:
    """Print the figures as the last line; write them to bench/results unless `quick` (a smoke
    test's figures mean nothing)."""
    if not quick:
        write_text_atomic(RESULTS / f"{name}.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def synthetic_kinetics_sounds(root: Path, clips: int, size: int, workers: int) -> Path:
    """Synthetic clips in the Kinetics-Sounds layout (3 classes x `clips` per split, 2 s each)
    prepped as `mmval prep kinetics-sounds` does, with frames of `size` x `size` and a 256-frame
    fbank: the data folder `root/ks`."""
    from mmval.data.prep import prepare
    from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw

    params = SyntheticAVParams(
        layout="kinetics-sounds",
        classes=["0", "1", "2"],
        clips_per_class=clips,
        seconds=2.0,
        size=(size, size),
    )
    write_synthetic_raw(root / "raw", params)
    data = root / "ks"
    prepare(
        "kinetics-sounds",
        data,
        raw=root / "raw",
        workers=workers,
        overrides=[f"modalities.0.size=[{size},{size}]", "modalities.1.target_frames=256"],
    )
    return data
