"""The run folder `output/name/seed<k>/`: its file names and readers for its plain files.

Torch-free: `mmval report` reads run folders through this module without importing torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

LAST = "last.pt"  # newest training state, for --resume
PREVIOUS = "last.prev.pt"  # the last.pt before the newest: resume falls back on it
BEST = "best.pt"  # weights at the best validation accuracy
SUMMARY = "summary.json"  # written when the run finished
METRICS = "metrics.parquet"  # one row per epoch
RECIPE_FILE = "recipe.yaml"  # the recipe as run, written when the run starts
LOG = "train.log"  # one JSON line per epoch
PREDICTIONS = "predictions.parquet"  # per-sample test predictions of best.pt
TB_DIR = "tb"  # TensorBoard event files (train.tensorboard)
CONTRIB_GLOB = "contrib_epoch*.parquet"  # valuation during training (the recipe's valuation:)
CONTRIB_EPOCH = re.compile(r"contrib_epoch(\d+)\.parquet$")


def contrib_file(epoch: int) -> str:
    """The file of the contributions valued after `epoch` (counted from 1)."""
    return f"contrib_epoch{epoch}.parquet"


def run_folder(output: Path | str, name: str, seed: int) -> Path:
    return Path(output) / name / f"seed{seed}"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json, or None before it finished."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """Every epoch's metrics of a run (empty before its first epoch ended)."""
    path = Path(run_dir) / METRICS
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()
